import pytest
import torch

import mmtoken
from mmtoken.plugins.cmai import inhibition
from mmtoken.testing import make_batch, select_rows


def test_inhibition_picks_the_lowest_focus_image_keys_of_text_rows():
    focus = torch.tensor([[[0.0, 0.3, 0.1, 0.2, 0.9], [0.0, 0.1, 0.2, 0.3, 0.0]]])
    image = torch.tensor([[False, True, True, True, True]])
    queries = torch.tensor([[True, False]])
    hit = inhibition(focus, image, queries, 0.5)
    assert hit[0, 0].tolist() == [False, False, True, True, False]  # 2 of 4 image keys: focus 0.1 and 0.2
    assert not hit[0, 1].any()


def _gen(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, **kw)


def test_strength_zero_is_identical(llava):
    batch = make_batch(llava, 3, seed=13)
    with torch.no_grad():
        ref = llava(**batch).logits
    g = _gen(llava, batch)
    with mmtoken.apply(llava, "cmai:strength=0"), torch.no_grad():
        assert torch.equal(llava(**batch).logits, ref)
        assert torch.equal(_gen(llava, batch), g)


def test_inhibition_changes_outputs_batch_equals_single_and_cache_equals_no_cache(llava):
    batch = make_batch(llava, 3, seed=14)
    with torch.no_grad():
        ref = llava(**batch).logits[:, -1]
    with mmtoken.apply(llava, "vmtc:keep=0.5+cmai:strength=4"), torch.no_grad():
        logits = llava(**batch).logits[:, -1]
        assert not torch.allclose(logits, ref, atol=1e-3)
        ids = _gen(llava, batch)
        for i in range(3):
            one = select_rows(batch, i)
            assert torch.allclose(llava(**one).logits[0, -1], logits[i], atol=1e-4)
            assert torch.equal(_gen(llava, one)[0, -8:], ids[i, -8:])
        assert torch.equal(_gen(llava, batch, use_cache=False), ids)


@pytest.mark.parametrize("spec,seed,beams", [
    ("cmai:strength=20,ratio=0.7", 7, 3), ("cmai:strength=20,ratio=0.7", 8, 3),
    ("fastv:k=1,keep=0.5+cmai:strength=20,ratio=0.7", 7, 1), ("fastv:k=1,keep=0.5+cmai:strength=20,ratio=0.7", 7, 3),
])
def test_decoding_with_the_cache_equals_without(llava, spec, seed, beams):
    """CMAI remembers every cached token's attention over the image. Beam search reorders the cache rows
    every step, and the remembered rows must follow (they live in the cache); after FastV shortened a
    layer, decoding must inhibit that layer as a cache-free step (a prefill) does."""
    batch = make_batch(llava, 2, seed=seed)
    with mmtoken.apply(llava, spec), torch.no_grad():
        a = llava.generate(**batch, max_new_tokens=8, num_beams=beams, do_sample=False)
        b = llava.generate(**batch, max_new_tokens=8, num_beams=beams, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_a_cache_that_grows_its_layers_lazily_keeps_the_history(llava):
    """``DynamicCache()`` without a config creates its layers as the model reaches them; CMAI's history must
    still find its place after them (else decoding would run uninhibited)."""
    from transformers import DynamicCache

    batch = make_batch(llava, 2, seed=7)
    with mmtoken.apply(llava, "cmai:strength=20,ratio=0.7"), torch.no_grad():
        a = llava.generate(**batch, max_new_tokens=8, do_sample=False, cache=DynamicCache())
        b = llava.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
