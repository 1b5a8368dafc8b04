"""The built-in models that ship inside the package."""

import numpy as np
import torch

import mmtoken
from mmtoken.benchmarks.runner import answer_batch
from mmtoken.benchmarks.tasks import TASKS


def test_tiny_llava_is_shipped_and_answers_from_the_image():
    assert "tiny-llava" in mmtoken.builtin_models()
    lm = mmtoken.load_model("tiny-llava")
    assert lm.model.config.model_type == "llava" and lm.model.dtype == torch.float32
    items = TASKS["synth-pope"].items(60)
    preds, first, visual = answer_batch(lm, items, 2, "cpu")
    assert visual == [144] * 60 and first.shape[0] == 60
    acc = sum(p == it.answers[0] for p, it in zip(preds, items)) / len(items)
    assert acc >= 0.75  # balanced yes/no: 0.5 without the image (docs/world.md has the measured figure)
    with mmtoken.apply(lm.model, "pool:stride=2") as h:
        answer_batch(lm, items[:4], 2, "cpu")
        assert h.stats.image_tokens_out == [36] * 4


def test_tiny_llava_next_is_shipped_and_reads_the_crops():
    assert "tiny-llava-next" in mmtoken.builtin_models()
    lm = mmtoken.load_model("tiny-llava-next")
    assert lm.model.config.model_type == "llava_next"
    items = TASKS["synth-hires"].items(64)
    preds, _, visual = answer_batch(lm, items, 2, "cpu")
    assert visual == [744] * 64  # a 96-px thumbnail + four 96-px crops (144 tokens each) + 24 newlines
    acc = sum(p == it.answers[0] for p, it in zip(preds, items)) / len(items)
    with mmtoken.apply(lm.model, "oracle:tokens=144") as h:  # the thumbnail alone
        thumb, _, _ = answer_batch(lm, items, 2, "cpu")
        assert h.stats.image_tokens_out == [144] * 64
    acc_thumb = sum(p == it.answers[0] for p, it in zip(thumb, items)) / len(items)
    assert acc >= 0.7 and acc - acc_thumb >= 0.15  # docs/world.md has the measured figures on the full split


def test_load_model_refuses_unknown_and_unsupported_checkpoints(tmp_path):
    import json

    import pytest

    from mmtoken.errors import MmtokenError

    with pytest.raises(MmtokenError, match="cannot load model"):
        mmtoken.load_model(str(tmp_path))  # a folder with no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MmtokenError, match="model type 'bert' is not supported"):
        mmtoken.load_model(str(tmp_path))


def test_tiny_seed_is_shipped_and_uses_half_its_codebook_on_held_out_images():
    import mmtoken.tokenizers as T

    assert T.builtin_tokenizers() == ["tiny-flextok", "tiny-seed"] and "tiny-seed" not in mmtoken.builtin_models()
    tok = T.load("tiny-seed")
    items = TASKS["synth-vqa"].items(200)
    ids = torch.cat([tok.encode([it.image for it in items[i : i + 50]]) for i in range(0, 200, 50)])
    assert ids.shape == (200, 32) and tok.image_size == 96
    assert torch.unique(ids).numel() >= 0.5 * tok.config.codes  # the codebook-usage target, on held-out images
    images = tok.decode(ids[:4])
    assert images.shape == (4, 3, 96, 96) and 0 <= images.min() and images.max() <= 1


def test_tiny_flextok_reconstructs_better_with_every_longer_prefix():
    """FlexTok's first target, on held-out images: quality rises with the number of tokens k."""
    import mmtoken.tokenizers as T

    tok = T.load("tiny-flextok")
    items = TASKS["synth-vqa"].items(24)
    x = torch.stack([torch.from_numpy(np.asarray(it.image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for it in items])
    ids = tok.encode(x)
    K = tok.config.registers
    assert ids.shape == (24, K) and tok.image_size == 96
    psnr = []
    for k in (1, 4, K):
        rec = tok.decode(ids[:, :k], steps=5)
        assert rec.shape == x.shape and 0 <= rec.min() and rec.max() <= 1
        psnr.append(float((10 * torch.log10(1 / ((rec - x) ** 2).mean(dim=(1, 2, 3)))).mean()))
    assert psnr[0] < psnr[1] < psnr[2] and psnr[2] - psnr[0] > 3, psnr
