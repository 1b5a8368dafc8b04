"""``positions=original``: a shortened image span keeps the position ids of the full sequence."""

import pytest
import torch

import mmtoken
from mmtoken.testing import make_batch, make_next_batch, select_rows


def _lm_inputs(model, batch):
    """(inputs_embeds, position_ids) the language model receives in one forward pass."""
    seen = {}

    def pre(_mod, args, kwargs):
        seen["emb"] = kwargs["inputs_embeds"].detach().clone()
        pos = kwargs.get("position_ids")
        seen["pos"] = None if pos is None else pos.detach().clone()

    h = model.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        h.remove()
    return seen["emb"], seen["pos"]


@pytest.fixture(scope="module")
def next_batch(llava_next):
    return make_next_batch(llava_next, [(64, 128), (128, 128), (128, 64)], seed=3)


@pytest.mark.parametrize("which,spec", [("llava", "random:keep=0.5,positions=original"),
                                        ("llava", "random:keep=0.1,positions=original"),
                                        ("next", "random:keep=0.5,positions=original"),
                                        ("next", "random:keep=0.2,positions=original")])
def test_every_kept_token_sits_at_its_original_position(llava, llava_next, next_batch, which, spec):
    """Text, kept image tokens and AnyRes newlines: the vector at shortened position j is the full
    sequence's vector at the position id it is given."""
    model = llava if which == "llava" else llava_next
    full_batch = make_batch(llava, 3, seed=5) if which == "llava" else next_batch
    for i in range(3):
        one = select_rows(full_batch, i)
        emb, _ = _lm_inputs(model, one)
        with mmtoken.apply(model, spec) as h:
            short, pos = _lm_inputs(model, one)
        assert h.stats.image_tokens_out[0] < h.stats.image_tokens_in[0]
        assert pos is not None and pos.shape == short.shape[:2]
        p = pos[0]
        assert bool((p[1:] > p[:-1]).all()), "position ids must increase"
        assert int(p[-1]) == emb.shape[1] - 1, "the last prompt token keeps its own position"
        assert torch.equal(short[0], emb[0, p])


def test_compact_numbers_afresh(llava):
    one = select_rows(make_batch(llava, 1, seed=5), 0)
    with mmtoken.apply(llava, "random:keep=0.5"):
        short, pos = _lm_inputs(llava, one)
    assert pos is None or torch.equal(pos[0], torch.arange(short.shape[1]))


@pytest.mark.parametrize("spec", ["random:keep=0.3,positions=original", "tome:keep=0.5,positions=original",
                                  "random:keep=0.5,positions=original+fastv:k=1,keep=0.5"])
def test_batch_equals_single_and_cache_free_decoding(llava, spec):
    batch = make_batch(llava, 3, seed=7)
    with mmtoken.apply(llava, spec), torch.no_grad():
        ids = llava.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        free = llava.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(ids, free), spec
        for i in range(3):
            one = llava.generate(**select_rows(batch, i), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert torch.equal(one[0, -6:], ids[i, -6:]), spec


def test_decode_continues_the_original_numbering(llava):
    """After a shortened prefill the first generated token is fed at the full prompt's length."""
    one = select_rows(make_batch(llava, 1, seed=9), 0)
    seen = []
    hook = llava.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    try:
        with mmtoken.apply(llava, "random:keep=0.25,positions=original"), torch.no_grad():
            llava.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    n = one["input_ids"].shape[1]
    assert [int(p[0, -1]) for p in seen] == [n - 1, n, n + 1]


def test_merged_tokens_sit_at_their_first_patch(llava_next, next_batch):
    """ToMe in the vision tower: every token keeps an increasing position id and the text and newlines
    land where they were."""
    one = select_rows(next_batch, 1)
    emb, _ = _lm_inputs(llava_next, one)
    with mmtoken.apply(llava_next, "tome:keep=0.5,positions=original"):
        short, pos = _lm_inputs(llava_next, one)
    p = pos[0]
    assert bool((p[1:] > p[:-1]).all())
    image = (one["input_ids"][0] == llava_next.config.image_token_id)
    text = ~image[p]
    assert torch.equal(short[0][text], emb[0, p[text]])
    newline = llava_next.model.image_newline
    is_nl = (short[0] == newline).all(-1)
    assert int(is_nl.sum()) > 0 and bool((emb[0, p[is_nl]] == newline).all())


def test_plugins_must_agree(llava):
    with pytest.raises(mmtoken.CompositionError, match="positions"):
        mmtoken.apply(llava, "random:keep=0.5,positions=original+pool")


def test_opera_and_beam_search_see_the_original_numbering(llava):
    """OPERA passes position ids itself; with alpha 0 and no rollback it equals beam search on the same
    shortened prompt, and both differ from compact numbering."""
    batch = make_batch(llava, 3, seed=8)  # two of its samples decode differently under the two numberings
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        with mmtoken.apply(llava, "random:keep=0.1,positions=original"):
            beam = llava.generate(**batch, num_beams=3, **kw)
        with mmtoken.apply(llava, "random:keep=0.1,positions=original+opera:num_beams=3,alpha=0,rollback=False,renormalize=False,n_can=6"):
            opera = llava.generate(**batch, **kw)
        with mmtoken.apply(llava, "random:keep=0.1"):
            compact = llava.generate(**batch, num_beams=3, **kw)
    assert torch.equal(opera, beam)
    assert not torch.equal(beam, compact)
