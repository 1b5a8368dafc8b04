"""The data a `visual`-stage plugin sees and returns: one image's visual tokens with their geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


@dataclass
class VisualTokens:
    """The visual tokens of one image (all its AnyRes crops included) between the projector and the LLM.

    Newline tokens of AnyRes models are not listed here: the adapter re-inserts one at the end of every
    row of the high-resolution grid that keeps at least one token.

    Attributes:
        features: ``[T, D]`` projected features (what the LLM would receive), in the model's order.
        vision_features: ``[T, Dv]`` the same tokens before the projector (for plugins that merge there).
        segment: ``[T]`` 0 for the base image / thumbnail, ``c >= 1`` for AnyRes crop ``c`` (row-major).
        row, col: ``[T]`` patch position inside the token's own segment (for merged tokens, the position
            of their first patch).
        grid: ``(rows, cols)`` of patches of one segment (one crop or the base image).
        crop_grid: ``(gh, gw)`` crops of the high-resolution view, ``None`` for single-view models.
        sizes: ``[T]`` how many patches each token stands for (1 unless a `vision` plugin merged).
        cls_attn: ViT layer -> ``[T]`` CLS-row attention (post-softmax, mean over heads), on request.
        cls_logits: ViT layer -> ``[T]`` CLS-row attention logits (pre-softmax, mean over heads), on request.
        keys: ViT layer -> ``[T, Dk]`` keys of the layer's attention (heads concatenated), on request.
        project: maps ``[E, Dv]`` vision features to ``[E, D]`` LLM features (the model's projector).
        vit_heads: attention heads of the vision tower (to split ``keys`` per head).
    """

    features: Tensor
    vision_features: Tensor
    segment: Tensor
    row: Tensor
    col: Tensor
    grid: tuple[int, int]
    crop_grid: tuple[int, int] | None
    sizes: Tensor
    cls_attn: dict[int, Tensor] = field(default_factory=dict)
    cls_logits: dict[int, Tensor] = field(default_factory=dict)
    keys: dict[int, Tensor] = field(default_factory=dict)
    project: Callable[[Tensor], Tensor] | None = None
    vit_heads: int = 1

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, idx: Tensor) -> "VisualTokens":
        """These tokens restricted to ``idx`` (for composing visual plugins)."""
        return VisualTokens(
            features=self.features[idx],
            vision_features=self.vision_features[idx],
            segment=self.segment[idx],
            row=self.row[idx],
            col=self.col[idx],
            grid=self.grid,
            crop_grid=self.crop_grid,
            sizes=self.sizes[idx],
            cls_attn={k: v[idx] for k, v in self.cls_attn.items()},
            cls_logits={k: v[idx] for k, v in self.cls_logits.items()},
            keys={k: v[idx] for k, v in self.keys.items()},
            project=self.project,
            vit_heads=self.vit_heads,
        )

    def segments(self) -> list[int]:
        return sorted(set(self.segment.tolist()))

    def view(self, segment: int) -> Tensor:
        """Indices of the tokens of one view (0: base image / thumbnail, c >= 1: crop c)."""
        return (self.segment == segment).nonzero().flatten()

    def views(self):
        """``(segment, indices)`` of every view present, in order."""
        return [(s, self.view(s)) for s in self.segments()]

    def require(self, what: str, layer: int) -> Tensor:
        """``self.cls_attn[layer]`` (or ``cls_logits`` / ``keys``), with a clear error if it was not captured."""
        table = getattr(self, what)
        if layer not in table:
            raise KeyError(f"{what} of ViT layer {layer} was not captured; declare it in visual_request()")
        return table[layer]


@dataclass
class Selection:
    """What a `visual` plugin keeps of one image.

    ``keep`` indexes :class:`VisualTokens` (any order; the adapter restores spatial order). ``extra`` are new
    tokens (e.g. merged ones) appended after the kept ones, given either as LLM features ``[E, D]`` or as
    vision features ``extra_vision`` ``[E, Dv]`` that the adapter passes through the projector.
    ``replace`` ``[len(keep), D]``, if given, are the features of the kept tokens (e.g. pooled ones), which
    keep their place in the layout.
    """

    keep: Tensor
    replace: Tensor | None = None
    extra: Tensor | None = None
    extra_vision: Tensor | None = None

    def n_extra(self) -> int:
        for t in (self.extra, self.extra_vision):
            if t is not None:
                return t.shape[0]
        return 0


@dataclass
class VisualRequest:
    """What a `visual` plugin needs captured from the vision tower, by ViT layer index (negative allowed)."""

    cls_attn: tuple[int, ...] = ()
    cls_logits: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()

    def merge(self, other: "VisualRequest") -> "VisualRequest":
        return VisualRequest(
            tuple(sorted(set(self.cls_attn) | set(other.cls_attn))),
            tuple(sorted(set(self.cls_logits) | set(other.cls_logits))),
            tuple(sorted(set(self.keys) | set(other.keys))),
        )

    def layers(self) -> set[int]:
        return set(self.cls_attn) | set(self.cls_logits) | set(self.keys)


def empty_index(device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)
