"""The hook layer on a tiny random LLaVA-1.5-shaped model: identity, reversibility, batching, caching,
side-computed attention rows, token counts, and clean errors."""

import pytest
import torch

import mmtoken
from mmtoken.attention import llm_attention_rows
from mmtoken.errors import ConfigError, SpecError, UnsupportedModelError
from mmtoken.testing import make_batch, select_rows, tiny_llava

KEEP_ALL = ["random:keep=1.0", "pool:stride=1", "visionzip:keep=1.0,contextual_ratio=0", "fastv:keep=1.0",
            "tome:r=0", "oracle:keep=1.0", "oracle-llm:keep=1.0"]
COMPRESSING = ["random:keep=0.25", "pool", "visionzip:tokens=16", "fastv:k=2,keep=0.25", "tome:keep=0.5",
               "oracle:keep=0.25", "oracle-llm:keep=0.25", "tome:keep=0.5+fastv:k=1,keep=0.5",
               "random:keep=0.5+fastv:k=2,keep=0.5"]


def _run(model, batch, new_tokens=8, **kw):
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        ids = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw)
    return logits, ids


@pytest.fixture(scope="module")
def batch(llava):
    return make_batch(llava, 4, seed=1)


@pytest.fixture(scope="module")
def reference(llava, batch):
    return _run(llava, batch)


@pytest.mark.parametrize("spec", KEEP_ALL)
def test_keep_everything_is_identical(llava, batch, reference, spec):
    with mmtoken.apply(llava, spec):
        logits, ids = _run(llava, batch)
    assert torch.equal(logits, reference[0])
    assert torch.equal(ids, reference[1])


@pytest.mark.parametrize("spec", COMPRESSING)
def test_remove_restores_bit_identical_outputs(llava, batch, reference, spec):
    handle = mmtoken.apply(llava, spec)
    changed, _ = _run(llava, batch)
    handle.remove()
    logits, ids = _run(llava, batch)
    assert not torch.equal(changed, reference[0])
    assert torch.equal(logits, reference[0]) and torch.equal(ids, reference[1])
    assert "forward" not in llava.model.__dict__ and "get_image_features" not in llava.model.__dict__


@pytest.mark.parametrize("spec", COMPRESSING)
def test_batch_equals_single(llava, batch, spec):
    with mmtoken.apply(llava, spec):
        logits, ids = _run(llava, batch)
        for i in range(batch["input_ids"].shape[0]):
            one = select_rows(batch, i)
            l1, g1 = _run(llava, one)
            assert torch.allclose(l1[0], logits[i], atol=1e-4), spec
            assert torch.equal(g1[0], ids[i, -g1.shape[1]:]), spec


@pytest.mark.parametrize("spec", COMPRESSING + ["none"])
def test_cache_equals_no_cache(llava, batch, spec):
    if spec == "none":
        _, a = _run(llava, batch, new_tokens=16)
        _, b = _run(llava, batch, new_tokens=16, use_cache=False)
    else:
        with mmtoken.apply(llava, spec):
            _, a = _run(llava, batch, new_tokens=16)
            _, b = _run(llava, batch, new_tokens=16, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "spec, layer_counts",
    [
        ("random:keep=0.25", {0: 16, 3: 16}),
        ("pool", {0: 16, 3: 16}),
        ("visionzip:tokens=16", {0: 16, 3: 16}),
        ("oracle:tokens=10", {0: 10}),
        ("fastv:k=2,keep=0.25", {0: 64, 1: 64, 2: 16, 3: 16}),
        ("tome:keep=0.5", {0: 32}),
        ("tome:keep=0.5+fastv:k=1,keep=0.5", {0: 32, 1: 16, 3: 16}),
    ],
)
def test_reported_visual_tokens_per_layer_match_the_budget(llava, batch, spec, layer_counts):
    with mmtoken.apply(llava, spec) as h, torch.no_grad():
        llava(**batch)
        for layer, n in layer_counts.items():
            assert h.stats.llm_visual_tokens[layer] == [n] * 4, (spec, layer)


def test_side_attention_rows_match_eager_while_sdpa_stays_on():
    model = tiny_llava(attn="sdpa", seed=3)
    eager = tiny_llava(attn="eager", seed=3)
    eager.load_state_dict(model.state_dict())
    batch = make_batch(model, 3, seed=2)
    captured = {}
    layer = model.model.language_model.layers[1]

    def pre(mod, args, kwargs):
        rows = torch.arange(kwargs["hidden_states"].shape[1])[None].expand(3, -1)
        captured["rows"] = llm_attention_rows(mod, kwargs["hidden_states"], kwargs["position_embeddings"],
                                              kwargs.get("attention_mask"), rows)

    h = layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
        ref = eager(**batch, output_attentions=True).attentions[1]
    h.remove()
    assert model.config.text_config._attn_implementation == "sdpa"
    valid = batch["attention_mask"].bool()
    got = captured["rows"]
    for b in range(3):  # compare rows of real (non-padding) queries
        q = valid[b].nonzero().flatten()
        assert torch.allclose(got[b][:, q], ref[b][:, q].float(), atol=1e-5)


def test_prompts_without_images_pass_through(llava):
    batch = make_batch(llava, 2, seed=5, with_image=[False, False])
    ref = _run(llava, batch)
    with mmtoken.apply(llava, "visionzip:tokens=8+fastv:keep=0.5"):
        got = _run(llava, batch)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


def test_mixed_batch_with_and_without_image(llava):
    batch = make_batch(llava, 3, seed=6, with_image=[True, False, True])
    with mmtoken.apply(llava, "random:keep=0.5+fastv:k=2,keep=0.5") as h:
        logits, ids = _run(llava, batch)
        assert h.stats.llm_visual_tokens[3] == [16, 0, 16]


def _snapshot(model):
    return {k: v for k, v in model.model.__dict__.items() if not k.startswith("_")}, [
        (len(l._forward_pre_hooks), len(l._forward_hooks)) for l in model.model.language_model.layers
    ]


@pytest.mark.parametrize(
    "spec, err",
    [("nosuch", SpecError), ("fastv:k=", SpecError), ("fastv:keep=2", ConfigError), ("fastv:k=9", ConfigError),
     ("visionzip:layer=40", Exception)],
)
def test_errors_leave_model_unchanged(llava, batch, reference, spec, err):
    before = _snapshot(llava)
    with pytest.raises(err):
        mmtoken.apply(llava, spec)
    assert _snapshot(llava) == before
    logits, _ = _run(llava, batch)
    assert torch.equal(logits, reference[0])


def test_unsupported_model_names_supported_classes():
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration.*LlavaNextForConditionalGeneration"):
        mmtoken.apply(torch.nn.Linear(2, 2), "fastv")


def test_double_apply_is_refused(llava):
    with mmtoken.apply(llava, "fastv"):
        with pytest.raises(mmtoken.CompositionError):
            mmtoken.apply(llava, "random")
    with mmtoken.apply(llava, "random"):
        pass


@pytest.mark.parametrize("spec", ["visionzip:keep=0.25", "random:keep=0.5+fastv:k=2,keep=0.5"])
def test_beam_search_with_and_without_cache(llava, spec):
    batch = make_batch(llava, 2, seed=7)
    with mmtoken.apply(llava, spec), torch.no_grad():
        a = llava.generate(**batch, max_new_tokens=6, num_beams=2, do_sample=False)
        b = llava.generate(**batch, max_new_tokens=6, num_beams=2, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_earlier_calls_do_not_change_later_ones(llava):
    """A handle's LLM-stage decisions on one prompt are never reused for another call: a second chat turn
    (the first prompt extended) or another image answers as on a freshly patched model."""
    one = select_rows(make_batch(llava, 1, seed=0), 0)
    other = select_rows(make_batch(llava, 1, seed=1), 0)
    ext = torch.cat([one["input_ids"], torch.tensor([[17, 42, 99, 23]])], dim=1)
    turn2 = {"input_ids": ext, "attention_mask": torch.ones_like(ext)}
    spec = "fastv:k=1,keep=0.25"
    with torch.no_grad():
        for pixels in (one["pixel_values"], other["pixel_values"]):
            with mmtoken.apply(llava, spec):
                fresh = llava(**turn2, pixel_values=pixels).logits
                fresh_gen = llava.generate(**turn2, pixel_values=pixels, max_new_tokens=6, do_sample=False)
            with mmtoken.apply(llava, spec):
                llava(**one)
                llava.generate(**one, max_new_tokens=4, do_sample=False, use_cache=False)
                assert torch.equal(llava(**turn2, pixel_values=pixels).logits, fresh)
                llava.generate(**one, max_new_tokens=4, do_sample=False, use_cache=False)
                assert torch.equal(llava.generate(**turn2, pixel_values=pixels, max_new_tokens=6, do_sample=False), fresh_gen)


def test_eager_attention_model_batch_equals_single():
    model = tiny_llava(attn="eager", seed=4)
    batch = make_batch(model, 3, seed=8)
    with mmtoken.apply(model, "visionzip:tokens=20+fastv:k=2,keep=0.5"):
        logits, ids = _run(model, batch)
        for i in range(3):
            l1, g1 = _run(model, select_rows(batch, i))
            assert torch.allclose(l1[0], logits[i], atol=1e-4)
            assert torch.equal(g1[0], ids[i, -g1.shape[1]:])


def test_vision_stage_with_beam_search_equals_single(llava):
    """generate() groups image features for beams by matching counts to placeholders; after a ViT merge the
    adapter groups them by placeholder runs instead, so every sample keeps its own image."""
    batch = make_batch(llava, 3, seed=15)
    with mmtoken.apply(llava, "tome:keep=0.5"), torch.no_grad():
        ids = llava.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=2, do_sample=False)
        for i in range(3):
            one = llava.generate(**select_rows(batch, i), max_new_tokens=5, min_new_tokens=5, num_beams=2, do_sample=False)
            assert torch.equal(one[0, -5:], ids[i, -5:])
    assert "_expand_multimodal_outputs" not in llava.__dict__
