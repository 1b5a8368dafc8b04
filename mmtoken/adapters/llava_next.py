"""Adapter for ``LlavaNextForConditionalGeneration`` (AnyRes: a base view + a grid of crops, newlines).

Geometry comes from the model's own packing: the adapter packs an index tensor with
``pack_image_features`` exactly as the model packs features, so every packed token is traced back to its
view (0 = base image, c >= 1 = crop c, row-major), its patch inside the view, and the row of the unpadded
high-resolution grid it lies on. After a `visual` plugin selects, tokens are re-packed in the same order
and a newline token ends every high-resolution row that keeps at least one token.

With a `vision` plugin (ToMe) each view reaches the projector with fewer tokens than its patch grid, which
the model's packing cannot reshape; ``pack_image_features`` is then replaced on the instance by one that
places each (merged) token at its first patch in the same order, ending kept rows with newlines. A merged
token whose first patch lies in the unpadded-away margin of a crop is dropped (it stands for the padding
that the model itself would cut).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor

from ..plugin import Plugin
from .llava import ImageMeta, LlavaAdapter, _with_extras


@dataclass
class Layout:
    """Where each token of one image lands in the packed sequence."""

    code: Tensor  # [P] packed sequence of view * n + patch, -1 for newlines
    n_views: int
    crop_grid: tuple[int, int] | None

    def content(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(positions in the packed sequence, ``view * n + patch`` codes, line, newline flags) of the content
        tokens; ``line`` counts the newlines before a token (the high-resolution row it belongs to)."""
        is_nl = self.code < 0
        pos = (~is_nl).nonzero().flatten()
        values = self.code[pos]
        line = torch.cumsum(is_nl.long(), 0)[pos]
        return pos, values, line, is_nl


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    anyres = True

    def install(self, plugins: list[Plugin]) -> None:
        super().install(plugins)
        if any("vision" in p.stages for p in plugins):
            self._undo.set_attr(self.base, "pack_image_features", types.MethodType(_merged_pack(self), self.base))

    def _layout(self, size) -> Layout:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

        vc = self.config.vision_config
        h, w = self.patch_grid
        n = h * w
        n_views = image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=vc.image_size)
        index = torch.arange(n_views * n, dtype=torch.float32).view(n_views, n, 1)
        sizes = size.unsqueeze(0) if torch.is_tensor(size) else torch.tensor([size])
        orig = type(self.base).pack_image_features  # the model's own packing, even when the instance's is replaced
        packed, _ = orig(self.base, [index], sizes, self.config.vision_feature_select_strategy, image_newline=torch.tensor([-1.0]))
        crop_grid = None
        if n_views > 1:
            gh, gw = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, vc.image_size)
            crop_grid = (int(gh), int(gw))
        return Layout(code=packed[0][:, 0].round().long(), n_views=n_views, crop_grid=crop_grid)

    def _record_meta(self, out, proj_in, captures, image_sizes) -> None:
        self._meta.clear()
        feats = list(out.pooler_output)
        attn_t, logit_t, key_t = self._cls_tables(captures)
        h, w = self.patch_grid
        n = h * w
        merged = getattr(self, "_merged_layouts", None)
        view_offset = 0
        for i, f in enumerate(feats):
            if merged is not None:
                content_pos, view, patch, line, sizes, n_views, crop_grid, src, run_offset, layout = merged[i]
                vis = proj_in[view_offset + view, src] if proj_in is not None else f[content_pos]
            else:
                layout = self._layout(image_sizes[i])
                n_views, crop_grid = layout.n_views, layout.crop_grid
                content_pos, values, line, _ = layout.content()
                run_offset = content_pos
                view, patch = values // n, values % n
                if n_views > 1:
                    line = torch.where(view == 0, torch.full_like(line, -1), line)
                sizes = torch.ones(content_pos.numel())
                vis = proj_in[view_offset + view, patch] if proj_in is not None else f[content_pos]
                src = patch
            gidx = view_offset + view
            dev = f.device
            self._meta[id(f)] = ImageMeta(
                n_content=int(content_pos.numel()), content_pos=content_pos.to(dev), segment=view.to(dev),
                row=(patch // w).to(dev), col=(patch % w).to(dev), grid=(h, w), crop_grid=crop_grid,
                sizes=sizes.float().to(dev), vision_features=vis,
                cls_attn={k: v[gidx, src] for k, v in attn_t.items()},
                cls_logits={k: v[gidx, src] for k, v in logit_t.items()},
                keys={k: v[gidx, src] for k, v in key_t.items()},
                packed_row=line.to(dev), newline=self.base.image_newline,
                run_offset=run_offset.to(dev), run_len=int(layout.code.numel()),
                newline_offset=(layout.code < 0).nonzero().flatten().to(dev),
            )
            view_offset += n_views
        self._merged_layouts = None

    def _assemble(self, kept: Tensor, meta: ImageMeta, alive: Tensor, extras: list[Tensor]) -> tuple[Tensor, Tensor]:
        lines = meta.packed_row[alive]
        packed, pos = with_newlines(kept, lines, meta.newline)
        offsets = torch.full((packed.shape[0],), -1, dtype=torch.long, device=packed.device)
        offsets[pos] = meta.run_offset[alive]
        if packed.shape[0] > kept.shape[0]:  # newlines: each at its row's newline in the full run
            slot_line = torch.full_like(offsets, -1)
            slot_line[pos] = lines.to(offsets.device)
            nl = (offsets < 0).nonzero().flatten()
            offsets[nl] = meta.newline_offset[slot_line[nl - 1]]
        return torch.cat([packed] + extras, dim=0), _with_extras(offsets, meta.run_len, extras)


def with_newlines(tokens: Tensor, lines: Tensor, newline: Tensor | None) -> tuple[Tensor, Tensor]:
    """``tokens`` ``[n, D]`` in packed order with a newline after the last token of every line (``lines``
    ``[n]``, non-decreasing; -1: a token whose line has no newline, the base view of AnyRes images).
    Returns the packed tensor and each token's position in it."""
    lines = lines.to(tokens.device)
    n = tokens.shape[0]
    ends = torch.ones(n, dtype=torch.bool, device=tokens.device)
    if n > 1:
        ends[:-1] = lines[1:] != lines[:-1]
    ends &= lines >= 0
    if newline is None or n == 0 or not bool(ends.any()):
        return tokens, torch.arange(n, device=tokens.device)
    before = torch.cumsum(ends.long(), 0) - ends.long()  # newlines inserted before each token
    pos = torch.arange(n, device=tokens.device) + before
    out = torch.empty(n + int(ends.sum()), tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
    out[pos] = tokens
    out[pos[ends] + 1] = newline.to(tokens.dtype)
    return out, pos


def _merged_pack(adapter: LlavaNextAdapter):
    """``pack_image_features`` for views whose tokens were merged in the vision tower."""

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        h, w = adapter.patch_grid
        n = h * w
        st = adapter._vstate
        pos_all = st.pos[:, 1:] if adapter.has_cls() else st.pos
        size_all = st.sizes[:, 1:] if adapter.has_cls() else st.sizes
        out, lens, layouts = [], [], []
        offset = 0
        for i, feats in enumerate(image_features):
            layout = adapter._layout(image_sizes[i])
            v = feats.shape[0]
            pos = pos_all[offset : offset + v].cpu()  # index bookkeeping on the host; features stay on their device
            size = size_all[offset : offset + v].cpu()
            rank = torch.full((layout.n_views * n,), -1, dtype=torch.long)
            content_pos, values, line, _ = layout.content()
            rank[values] = content_pos
            line_of = torch.full((layout.n_views * n,), -1, dtype=torch.long)
            line_of[values] = line
            view = torch.arange(v)[:, None].expand_as(pos)
            key = view * n + pos.clamp(min=0)
            r = rank[key].flatten()
            ok = r >= 0
            order = torch.argsort(r.masked_fill(~ok, 1 << 40))[: int(ok.sum())]
            flat = feats.reshape(-1, feats.shape[-1])[order.to(feats.device)]
            vw, src = view.flatten()[order], torch.arange(pos.shape[1]).repeat(v)[order]
            tok_line = line_of[key.flatten()[order]]
            if layout.n_views > 1:
                tok_line = torch.where(vw == 0, torch.full_like(tok_line, -1), tok_line)
            patch = pos.flatten()[order]
            packed, packed_pos = with_newlines(flat, tok_line, image_newline)
            out.append(packed)
            lens.append(packed.shape[0])
            layouts.append((packed_pos.cpu(), vw, patch, tok_line, size.flatten()[order], layout.n_views, layout.crop_grid, src,
                            r[order], layout))
            offset += v
        adapter._merged_layouts = layouts
        return out, torch.tensor(lens, dtype=torch.long, device=image_features[0].device)

    return pack_image_features
