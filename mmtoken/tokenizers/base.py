"""What every image tokenizer offers: ``encode`` images to ids, ``decode`` ids to images, save and load."""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import MmtokenError

CONFIG_FILE = "image_tokenizer.json"
WEIGHTS_FILE = "model.safetensors"


def to_tensor(images: Any, size: int) -> Tensor:
    """A float tensor ``[B, 3, size, size]`` in [0, 1] from a list of PIL images (resized with bicubic
    filtering when needed) or a tensor of that shape."""
    if torch.is_tensor(images):
        if images.dim() != 4 or images.shape[1] != 3:
            raise MmtokenError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return images.float().clamp(0, 1)
    from PIL import Image

    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise MmtokenError(f"images must be PIL images or a tensor, got {type(im).__name__}")
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


class ImageTokenizer(torch.nn.Module):
    """Base class: subclasses set ``kind`` and ``Config`` (a dataclass with ``image_size``) and implement
    :meth:`encode` and :meth:`decode`."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type] = object
    flexible_length: ClassVar[bool] = False  # decodes any prefix ids[:, :k]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode(self, images: Any) -> Tensor:
        raise NotImplementedError

    def decode(self, ids: Tensor, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def save_pretrained(self, path: str, extra: dict | None = None, dtype: torch.dtype | None = None) -> None:
        """Config as JSON, weights as safetensors; ``dtype`` (e.g. ``torch.float16``) stores the floating-point
        tensors at that precision (loading casts them back to the module's float32)."""
        from dataclasses import asdict

        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump({"kind": self.kind, "config": asdict(self.config)} | (extra or {}), f, indent=1)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, os.path.join(path, WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str) -> "ImageTokenizer":
        from safetensors.torch import load_file

        cfg_path = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(cfg_path):
            raise MmtokenError(f"{path}: no {CONFIG_FILE} (not a saved mmtoken tokenizer)")
        with open(cfg_path) as f:
            data = json.load(f)
        kinds = _kinds()
        kind = data.get("kind")
        if kind not in kinds:
            raise MmtokenError(f"{cfg_path}: field 'kind' is {kind!r}; expected one of {sorted(kinds)}")
        target = kinds[kind]
        if cls is not ImageTokenizer and not issubclass(target, cls):
            raise MmtokenError(f"{cfg_path}: a {kind} tokenizer, not a {cls.kind}")
        try:
            config = target.Config(**data["config"])
        except (KeyError, TypeError) as exc:
            raise MmtokenError(f"{cfg_path}: field 'config' is invalid ({exc})") from None
        tok = target(config)
        tok.load_state_dict(load_file(os.path.join(path, WEIGHTS_FILE)))
        return tok.eval()


def _kinds() -> dict[str, type[ImageTokenizer]]:
    from .flextok import FlexTok
    from .seed import Seed

    return {FlexTok.kind: FlexTok, Seed.kind: Seed}
