"""Adapter for ``LlavaNextForConditionalGeneration`` (AnyRes: a base view + a grid of crops, newlines).

Geometry comes from the model's own packing: the adapter packs an index tensor with
``pack_image_features`` exactly as the model packs features, so every packed token is traced back to its
view (0 = base image, c >= 1 = crop c, row-major), its patch inside the view, and the row of the unpadded
high-resolution grid it lies on. After a `visual` plugin selects, tokens are re-packed in the same order
and a newline token ends every high-resolution row that keeps at least one token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CompositionError
from ..plugin import Plugin
from .llava import ImageMeta, LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    anyres = True

    def install(self, plugins: list[Plugin]) -> None:
        for p in plugins:
            if "vision" in p.stages:
                raise CompositionError(
                    f"{p.name}: vision-stage merging is not supported on LLaVA-NeXT yet (AnyRes packing needs "
                    "every crop's full patch grid); use it on LLaVA-1.5 models"
                )
        super().install(plugins)

    def _record_meta(self, out, proj_in, captures, image_sizes) -> None:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        self._meta.clear()
        feats = list(out.pooler_output)
        attn_t, logit_t, key_t = self._cls_tables(captures)
        vc = self.config.vision_config
        h, w = self.patch_grid
        n = h * w
        strategy = self.config.vision_feature_select_strategy
        view_offset = 0
        for i, f in enumerate(feats):
            size = image_sizes[i]
            n_views = image_size_to_num_patches(
                image_size=size, grid_pinpoints=self.config.image_grid_pinpoints, patch_size=vc.image_size
            )
            index = torch.arange(n_views * n, dtype=torch.float32).view(n_views, n, 1)
            packed, _ = self.base.pack_image_features(
                [index], size.unsqueeze(0) if torch.is_tensor(size) else torch.tensor([size]), strategy,
                image_newline=torch.tensor([-1.0]),
            )
            code = packed[0][:, 0].round().long().to(f.device)
            is_nl = code < 0
            content_pos = (~is_nl).nonzero().flatten()
            values = code[content_pos]
            view, patch = values // n, values % n
            line = torch.cumsum(is_nl.long(), 0)[content_pos]
            if n_views > 1:
                line = torch.where(view == 0, torch.full_like(line, -1), line)
                gh, gw = get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, vc.image_size)
                crop_grid = (int(gh), int(gw))
            else:
                crop_grid = None
            gidx = view_offset + view
            self._meta[id(f)] = ImageMeta(
                n_content=int(content_pos.numel()),
                content_pos=content_pos,
                segment=view,
                row=patch // w,
                col=patch % w,
                grid=(h, w),
                crop_grid=crop_grid,
                sizes=torch.ones(content_pos.numel(), device=f.device),
                vision_features=proj_in[gidx, patch] if proj_in is not None else f[content_pos],
                cls_attn={k: v[gidx, patch] for k, v in attn_t.items()},
                cls_logits={k: v[gidx, patch] for k, v in logit_t.items()},
                keys={k: v[gidx, patch] for k, v in key_t.items()},
                packed_row=line,
                newline=self.base.image_newline,
            )
            view_offset += n_views

    def _assemble(self, kept: Tensor, meta: ImageMeta, alive: Tensor, extras: list[Tensor]) -> Tensor:
        lines = meta.packed_row[alive]
        newline = meta.newline.to(kept.dtype)[None]
        parts: list[Tensor] = []
        start = 0
        n = int(alive.numel())
        for j in range(n):
            if j == n - 1 or bool(lines[j + 1] != lines[j]):
                parts.append(kept[start : j + 1])
                if int(lines[j]) >= 0:
                    parts.append(newline)
                start = j + 1
        return torch.cat(parts + extras, dim=0) if parts or extras else kept[:0]
