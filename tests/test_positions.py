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
                                        ("llava", "tome:keep=0.5,positions=original+random:keep=0.5,positions=original"),
                                        ("next", "random:keep=0.5,positions=original"),
                                        ("next", "random:keep=0.2,positions=original")])
@pytest.mark.parametrize("padded", [False, True])
def test_every_kept_token_sits_at_its_original_position(llava, llava_next, next_batch, which, spec, padded):
    """Text, kept image tokens and AnyRes newlines: the vector at shortened position j is the full
    sequence's vector at the position id it is given (the model's default ids: the index in the padded
    row), alone and in a left-padded batch."""
    model = llava if which == "llava" else llava_next
    full_batch = make_batch(llava, 3, seed=5) if which == "llava" else next_batch
    batches = [full_batch] if padded else [select_rows(full_batch, i) for i in range(3)]
    for batch in batches:
        emb, _ = _lm_inputs(model, batch)
        with mmtoken.apply(model, spec) as h:
            short, pos = _lm_inputs(model, batch)
        assert all(o < i for o, i in zip(h.stats.image_tokens_out, h.stats.image_tokens_in))
        assert pos is not None and pos.shape == short.shape[:2]
        for row, (e_row, s_row, p_row) in enumerate(zip(emb, short, pos)):
            n = int(_real(model, batch, row, h))
            p = p_row[-n:]  # left padded: the real tokens are the last n
            assert bool((p[1:] > p[:-1]).all()), "position ids must increase"
            assert int(p[-1]) == emb.shape[1] - 1, "the last prompt token keeps its own position"
            if "tome" not in spec:  # merged tokens are new vectors
                assert torch.equal(s_row[-n:], e_row[p])
            else:
                text = batch["input_ids"][row, p] != model.config.image_token_id
                assert torch.equal(s_row[-n:][text], e_row[p[text]])
            if which == "next":  # a newline takes its own row's id: the first newline after the token before it
                is_nl = (e_row == model.model.image_newline).all(-1)
                for j in (s_row[-n:] == model.model.image_newline).all(-1).nonzero().flatten().tolist():
                    after = is_nl.nonzero().flatten()
                    assert int(p[j]) == int(after[after > p[j - 1]][0])


def _real(model, batch, row, handle):
    """Real tokens of ``row`` after shortening."""
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    n_img = int((ids == model.config.image_token_id).sum())
    has = (batch["input_ids"] == model.config.image_token_id).any(-1).tolist()
    k = sum(has[:row])
    return ids.numel() - n_img + (handle.stats.image_tokens_out[k] if has[row] else 0)


def test_compact_numbers_afresh(llava):
    batch = make_batch(llava, 2, seed=5)
    given = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # what generate() passes
    with mmtoken.apply(llava, "random:keep=0.5"):
        short, pos = _lm_inputs(llava, dict(batch, position_ids=given))
    for row, p in enumerate(pos):  # real tokens numbered 0, 1, ... in the shortened row
        n = int((p > 0).sum()) + 1
        assert torch.equal(p[-n:], torch.arange(n))


def test_without_a_mask_the_gaps_do_not_split_attention(llava):
    """transformers reads jumps in explicit position ids as packed sequences when no mask is given."""
    one = select_rows(make_batch(llava, 1, seed=5), 0)
    with mmtoken.apply(llava, "random:keep=0.5,positions=original"), torch.no_grad():
        bare = llava(input_ids=one["input_ids"], pixel_values=one["pixel_values"], use_cache=False).logits
        masked = llava(**one, use_cache=False).logits
    assert torch.allclose(bare, masked, atol=1e-5)


def test_manual_decoding_without_position_ids_continues_the_numbering(llava):
    """A decode loop that passes no position ids (the model's default numbering) gets the full cache's ids."""
    one = select_rows(make_batch(llava, 1, seed=9), 0)
    n = one["input_ids"].shape[1]
    seen = []
    hook = llava.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    try:
        with mmtoken.apply(llava, "random:keep=0.25,positions=original"), torch.no_grad():
            out = llava(input_ids=one["input_ids"], pixel_values=one["pixel_values"], use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(2):
                out = llava(input_ids=tok, cache=out.cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            ref = llava.generate(**one, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert [int(p[0, -1]) for p in seen[:3]] == [n - 1, n, n + 1]
    assert int(tok[0, 0]) == int(ref[0, -1])


def test_visionzip_contextual_tokens_take_ids_of_removed_tokens(llava, llava_next, next_batch):
    for model, batch in ((llava, make_batch(llava, 3, seed=5)), (llava_next, next_batch)):
        for i in range(3):
            one = select_rows(batch, i)
            with mmtoken.apply(model, "visionzip:keep=0.25,positions=original"):
                _, pos = _lm_inputs(model, one)
            assert pos[0].unique().numel() == pos.shape[1], "two tokens share a position id"


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


def test_position_ids_broadcast_over_the_batch_and_same_length_reorders(llava):
    batch = make_batch(llava, 3, seed=5)
    l = batch["input_ids"].shape[1]
    with mmtoken.apply(llava, "random:keep=0.5,positions=original"), torch.no_grad():
        one_row = llava(**batch, position_ids=torch.arange(l)[None]).logits
        full = llava(**batch, position_ids=torch.arange(l).expand(3, l)).logits
    assert torch.equal(one_row, full)
    # keep=1.0: VisionZip keeps the count but its contextual tokens stand where removed tokens were
    one = select_rows(batch, 0)
    with mmtoken.apply(llava, "visionzip:keep=1.0,positions=original") as h:
        _, pos = _lm_inputs(llava, one)
    assert h.stats.image_tokens_out == h.stats.image_tokens_in and pos is not None


@pytest.mark.parametrize("spec", ["random:keep=1.0,positions=original", "pool:stride=1,positions=original"])
def test_keep_everything_with_original_ids_is_identical(llava, spec):
    batch = make_batch(llava, 3, seed=6)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        ref_logits, ref_ids = llava(**batch).logits, llava.generate(**batch, **kw)
        with mmtoken.apply(llava, spec):
            logits, ids = llava(**batch).logits, llava.generate(**batch, **kw)
        after = llava(**batch).logits
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids) and torch.equal(after, ref_logits)
