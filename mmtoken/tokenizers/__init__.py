"""Image tokenizers: images to short discrete id sequences and back.

    tok = mmtoken.tokenizers.load("tiny-seed")        # a built-in name or a saved folder
    ids = tok.encode(images)                           # LongTensor [B, K]
    recon = tok.decode(ids)                            # [B, 3, H, W] in [0, 1]; a FlexTok decodes any prefix ids[:, :k]
"""

from __future__ import annotations

import os

from ..errors import MmtokenError
from .base import ImageTokenizer
from .flextok import FlexTok, FlexTokConfig
from .fsq import FSQ
from .seed import Seed, SeedConfig

__all__ = ["FSQ", "FlexTok", "FlexTokConfig", "ImageTokenizer", "Seed", "SeedConfig", "builtin_tokenizers", "load"]

CHECKPOINTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")


def builtin_tokenizers() -> list[str]:
    """Names of the tokenizers shipped in this installation."""
    if not os.path.isdir(CHECKPOINTS):
        return []
    return sorted(n for n in os.listdir(CHECKPOINTS) if os.path.isfile(os.path.join(CHECKPOINTS, n, "image_tokenizer.json")))


def load(name_or_path: str) -> ImageTokenizer:
    """A built-in tokenizer by name (:func:`builtin_tokenizers`) or one saved with ``save_pretrained``."""
    path = os.path.join(CHECKPOINTS, name_or_path) if name_or_path in builtin_tokenizers() else name_or_path
    if not os.path.isdir(path):
        raise MmtokenError(f"no tokenizer {name_or_path!r}: not a built-in name ({', '.join(builtin_tokenizers()) or 'none shipped'}) or a folder")
    return ImageTokenizer.from_pretrained(path)
