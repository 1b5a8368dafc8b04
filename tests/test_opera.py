import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import mmtoken
from mmtoken.plugins.opera import OperaPlugin, column_penalty, common_prefix, rollback_column
from mmtoken.testing import make_batch, select_rows


def _window(t: int, col: int, strong: float = 0.6) -> torch.Tensor:
    """A response window (rows need not sum to 1: the rest of each row is on the prompt) in which every row
    from ``col`` on puts ``strong`` on column ``col`` and 0.01 on every other response column."""
    w = torch.full((t, t), 0.01).tril()
    w[col:, col] = strong
    return w


def test_column_penalty_is_the_column_product_in_log_space():
    w = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.3, 0.0], [0.1, 0.4, 0.2]])
    pen, col = column_penalty(w, sigma=10.0, eps=1.0)
    phi = [5 * 2 * 1, 3 * 4, 2]  # prod over rows i >= c of 10 * w[i, c]
    assert col.item() == 1 and math.isclose(pen.item(), max(phi), rel_tol=1e-5)
    # the official constant: eps scales every column alike
    pen2, col2 = column_penalty(w, sigma=10.0, eps=1e-7)
    assert col2.item() == 1 and math.isclose(pen2.item(), 12e-7, rel_tol=1e-5)
    # long windows do not overflow: the product is a sum of logarithms
    big, _ = column_penalty(_window(200, 3, 0.9), sigma=50.0)
    assert torch.isfinite(big).all()


def test_an_aggregating_column_wins_and_triggers_a_rollback_to_it():
    r = 4
    history = []
    for t in range(6, 6 + r + 1):
        windows = torch.stack([_window(t, 3), _window(t, 3, 0.7)])  # two beams
        _, col = column_penalty(windows, sigma=50.0)
        assert col.tolist() == [3, 3]
        history.append(col)
        if len(history) <= r:
            assert rollback_column(history, r) is None
    assert rollback_column(history, r) == 3
    # one beam that does not agree prevents it
    assert rollback_column(history[:-1] + [torch.tensor([3, 5])], r) is None


def test_common_prefix_lengths():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 9]])
    b = torch.tensor([[1, 2, 3, 0], [7, 2, 3, 4]])
    assert common_prefix(a, b).tolist() == [[3, 0], [2, 0]]


def _cache_of(model, seqs):
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        out = model.model.language_model(input_ids=seqs, cache=cache, use_cache=True)
    return cache, out.last_hidden_state


def test_shared_cache_after_a_rollback_equals_a_cache_built_from_scratch(llava):
    """Two samples share one cache (prompts of different lengths, left-padded; a multi-token feed of one
    leaves holes in the other). Sample 0 rolls back: its rows must then hold, at the columns they attend
    to, exactly the keys and values of its restored sequences computed from scratch, and the next token
    must get the same hidden state."""
    from mmtoken.plugins.opera import _SharedCache, restore_plan

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 100, (6,), generator=g), torch.randint(5, 100, (4,), generator=g)]
    beams, width = 3, 6
    ids = torch.zeros(2 * beams, width, dtype=torch.long)
    mask = torch.zeros(2 * beams, width, dtype=torch.long)
    for b, q in enumerate(prompts):
        ids[b * beams : (b + 1) * beams, width - q.numel() :] = q
        mask[b * beams : (b + 1) * beams, width - q.numel() :] = 1
    plugin = OperaPlugin(OperaPlugin.Config())
    with torch.no_grad():
        out = plugin._forward(llava, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        shared = _SharedCache(out.past_key_values, mask)
        samples = [SimpleNamespace(rows=torch.arange(b * beams, (b + 1) * beams), p=q.numel(), cols=torch.zeros(0, dtype=torch.long))
                   for b, q in enumerate(prompts)]
        live = torch.tensor([[11, 12, 13, 14, 15], [11, 12, 20, 21, 22], [30, 31, 32, 33, 34]])
        for t in range(live.shape[1]):  # sample 0 one token a step; sample 1 three tokens at step 1
            feeds = [(samples[0], live[:, t : t + 1])]
            if t == 1:
                feeds.append((samples[1], torch.randint(5, 100, (beams, 3), generator=g)))
            plugin._feed(llava, shared, feeds, pad=0)
        # restored beams: two continue live rows (one shares only 2 response tokens), one is a live row's prefix
        restored = torch.tensor([[11, 12, 13], [30, 31, 32], [11, 12, 40]])
        p = samples[0].p
        full_live = torch.cat([prompts[0].expand(beams, -1), live], dim=1)
        full_restored = torch.cat([prompts[0].expand(beams, -1), restored], dim=1)
        rows, m = restore_plan(full_restored, full_live)
        assert rows.tolist() == [0, 2, 0] and m == p + 2
        perm = torch.arange(2 * beams)
        perm[:beams] = rows
        shared.cache.reorder_cache(perm)
        shared.crop(samples[0], m - p)
        plugin._feed(llava, shared, [(samples[0], full_restored[:, m:])], pad=0)
        nxt = torch.tensor([[7], [8], [9]])
        got = plugin._feed(llava, shared, [(samples[0], nxt)], pad=0)
    fresh, hidden = _cache_of(llava, torch.cat([full_restored, nxt], dim=1))
    n_prompt = width
    attend = torch.cat([shared.prompt_mask[:beams], shared.extra[:beams]], dim=1)  # sample 0's rows share it
    assert bool((attend[0] == attend[1]).all()) and int(attend[0].sum()) == full_restored.shape[1] + 1
    cols = attend[0].nonzero().flatten()
    assert cols[p:].tolist() == (n_prompt + samples[0].cols).tolist()
    for got_layer, want in zip(shared.cache.layers, fresh.layers):
        assert torch.allclose(got_layer.keys[:beams, :, cols], want.keys, atol=1e-5)
        assert torch.allclose(got_layer.values[:beams, :, cols], want.values, atol=1e-5)
    with torch.no_grad():
        want_logits = llava.lm_head(hidden[:, -1])
    assert torch.allclose(got.logits[:beams, -1], want_logits, atol=1e-4)


def _gen(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=10, do_sample=False, **kw)


@pytest.mark.parametrize("seed", [3, 4])
def test_alpha_zero_without_rollback_is_plain_beam_search(llava, seed):
    batch = make_batch(llava, 3, seed=seed)
    ref = _gen(llava, batch, num_beams=3)
    greedy = _gen(llava, batch)
    assert not torch.equal(ref, greedy)  # beam search matters on these prompts
    for spec in ("opera:num_beams=3,alpha=0,rollback=False,renormalize=False,n_can=6",
                 f"opera:num_beams=3,alpha=0,rollback=False,n_can={llava.config.text_config.vocab_size}"):
        with mmtoken.apply(llava, spec):
            assert torch.equal(_gen(llava, batch), ref), spec
    with mmtoken.apply(llava, "beam:num_beams=3"):
        assert torch.equal(_gen(llava, batch), ref)
    with mmtoken.apply(llava, "greedy"):
        assert torch.equal(_gen(llava, batch, num_beams=3), greedy)


def test_penalty_and_rollbacks_run_batched_like_single_and_compose(llava):
    batch = make_batch(llava, 3, seed=5)
    spec = "opera:num_beams=2,n_can=3,r=2,min_rollback_pos=0,sigma=400"
    with mmtoken.apply(llava, spec) as h:
        ids = _gen(llava, batch)
        backs = list(h.plugins[0].last_rollbacks)
        for i in range(3):
            one = select_rows(batch, i)
            n = ids.shape[1] - batch["input_ids"].shape[1]
            got = _gen(llava, one)[0, one["input_ids"].shape[1] :]
            assert torch.equal(got, ids[i, -n:][: got.numel()])
    assert sum(backs) > 0  # retrospection really happened
    with mmtoken.apply(llava, "opera:num_beams=2,alpha=0,rollback=False,renormalize=False,n_can=4"):
        plain = _gen(llava, batch)
    with mmtoken.apply(llava, spec.replace("sigma=400", "sigma=400,alpha=50")):
        assert not torch.equal(_gen(llava, batch), plain)  # the penalty changes decoding
    with mmtoken.apply(llava, "fastv:k=1,keep=0.5+" + spec) as h:
        out = _gen(llava, batch)
        assert out.shape[0] == 3
        n_img = int((batch["input_ids"][0] == llava.config.image_token_id).sum())
        assert h.stats.llm_visual_tokens[2] == [n_img // 2] * 3  # one row per sample, not per beam
    with mmtoken.apply(llava, "opera:num_beams=1,r=2,min_rollback_pos=0"):  # greedy + penalty
        assert _gen(llava, batch).shape[0] == 3


@pytest.mark.parametrize("seed", [7, 8])
def test_composes_with_cmai(llava, seed):
    """CMAI's per-token history follows OPERA's candidate choice, and CMAI sees the candidate block mask:
    OPERA without penalty or rollback, composed with CMAI, is beam search with CMAI (which differs from
    plain beam search)."""
    batch = make_batch(llava, 2, seed=seed)
    cmai = "cmai:strength=20,ratio=0.7"
    with mmtoken.apply(llava, cmai):
        ref = _gen(llava, batch, num_beams=3)
    for spec in (f"{cmai}+opera:num_beams=3,alpha=0,rollback=False,renormalize=False,n_can=6",
                 f"opera:num_beams=3,alpha=0,rollback=False,renormalize=False,n_can=6+{cmai}"):
        with mmtoken.apply(llava, spec):
            assert torch.equal(_gen(llava, batch), ref), spec
    with mmtoken.apply(llava, "beam:num_beams=3"):
        assert not torch.equal(_gen(llava, batch), ref)


def test_return_dict_gives_first_step_logits(llava):
    batch = make_batch(llava, 2, seed=6)
    with torch.no_grad():
        ref = llava(**batch).logits[:, -1]
    with mmtoken.apply(llava, "opera:num_beams=2"), torch.no_grad():
        out = llava.generate(**batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 2 and torch.allclose(out.logits[0], ref, atol=1e-4)


def test_llava_next_batch_equals_single(llava_next):
    from mmtoken.testing import make_next_batch

    s = llava_next.config.vision_config.image_size
    batch = make_next_batch(llava_next, [(2 * s, s), (s, s), (s, 2 * s)], seed=7)
    with mmtoken.apply(llava_next, "opera:num_beams=2,n_can=3,r=2,min_rollback_pos=0,sigma=400"):
        ids = _gen(llava_next, batch)
        for i in range(3):
            one = select_rows(batch, i)
            got = _gen(llava_next, one)[0, one["input_ids"].shape[1] :]
            n = ids.shape[1] - batch["input_ids"].shape[1]
            assert torch.equal(got, ids[i, -n:][: got.numel()])


def test_user_logits_processors_are_honoured(llava):
    batch = make_batch(llava, 2, seed=7)
    with mmtoken.apply(llava, "opera:num_beams=2"), torch.no_grad():
        free = llava.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        banned = int(free[0, 0])

        def ban(input_ids, scores):
            scores[:, banned] = -float("inf")
            return scores

        out = llava.generate(**batch, max_new_tokens=4, do_sample=False, logits_processor=[ban])
    assert not (out[:, batch["input_ids"].shape[1]:] == banned).any()
