"""The `attention` and `decode` stages, with small plugins defined here."""

from dataclasses import dataclass

import torch

import mmtoken
from mmtoken.config import param
from mmtoken.testing import make_batch, select_rows


@dataclass
class BiasConfig(mmtoken.PluginConfig):
    value: float = param(0.0)


class ImageBias(mmtoken.Plugin):
    """Adds ``value`` to the logits of every (query, image key) pair in every layer."""

    name = "image-bias-test"
    stages = ("attention",)
    Config = BiasConfig
    compresses = False

    def attention_layers(self, n_layers):
        return list(range(n_layers))

    def attention_bias(self, layer, q_len, kv_len, ctx):
        run = ctx["run"]
        if run.mode != "prefill":
            return None
        img = run.image_mask[:, None, None, :kv_len]
        return img.float() * self.config.value


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[:, -1]


def test_zero_bias_matches_the_unpatched_model(llava):
    batch = make_batch(llava, 3, seed=11)
    ref = _logits(llava, batch)
    with mmtoken.apply(llava, ImageBias(BiasConfig(0.0))):
        got = _logits(llava, batch)
    assert torch.allclose(got, ref, atol=1e-5)


def test_minus_infinity_bias_equals_masking_the_image(llava):
    """A huge negative bias on image keys = the text never sees the image: same as a prompt whose image
    tokens attend nowhere, checked by batch == single and by its distance from the normal output."""
    batch = make_batch(llava, 2, seed=12)
    ref = _logits(llava, batch)
    with mmtoken.apply(llava, ImageBias(BiasConfig(-1e4))):
        got = _logits(llava, batch)
        alone = _logits(llava, select_rows(batch, 1))
    assert not torch.allclose(got, ref, atol=1e-3)
    assert torch.allclose(alone[0], got[1], atol=1e-4)


class CountingDecode(mmtoken.Plugin):
    name = "count-decode-test"
    stages = ("decode",)
    Config = mmtoken.PluginConfig
    compresses = False
    calls = 0

    def wrap_generate(self, generate, model):
        def wrapped(*args, **kwargs):
            CountingDecode.calls += 1
            return generate(*args, **kwargs)

        return wrapped


def test_decode_stage_wraps_generate_and_unwraps(llava):
    batch = make_batch(llava, 1)
    with mmtoken.apply(llava, CountingDecode(mmtoken.PluginConfig())), torch.no_grad():
        llava.generate(**batch, max_new_tokens=2)
    assert CountingDecode.calls == 1
    assert "generate" not in llava.__dict__
