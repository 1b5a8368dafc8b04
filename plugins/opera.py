"""``opera``: over-trust penalty and retrospection-allocation (OPERA, CVPR 2024), `decode` stage.

Beam search in which every beam's next token is chosen among its top ``n_can`` candidates (N_can), each
scored by its log-probability minus ``alpha`` times an *over-trust penalty* read off the last decoder
layer's attention, with a *rollback* when the same aggregation column keeps winning.

Penalty. For a candidate, take the last layer's attention (max over heads, each row a full softmax over the
whole sequence) among the response tokens: the rows of the tokens generated so far plus the candidate's
own row, restricted to the response columns — a lower-triangular ``T x T`` window. For each column ``c``,
``phi_c = eps * prod_{i >= c} sigma * w[i, c]`` (rows from ``c`` itself to the candidate, as in the official
code), computed as a sum of logarithms in float32; the penalty is ``max_c phi_c`` and its argmax column is
the candidate's *aggregation column*. Candidates outside the top ``n_can`` are excluded.

Scores. ``renormalize=True`` (the paper's Softmax over the candidate set): a candidate's step score is
``log_softmax`` over the candidates of ``logit - alpha * penalty``. ``renormalize=False``: the model's own
log-probability minus ``alpha * penalty``; then ``alpha=0`` with ``n_can >= 2 * num_beams`` is exactly
plain beam search (tested), as is ``renormalize=True`` with ``n_can`` = the vocabulary size.

Retrospection. Each step records, per beam, the most frequent aggregation column among its candidates; the
step's column ``loc`` is the most frequent over the sample's beams. When every beam's record holds ``loc``
more than ``r`` times and ``loc >= min_rollback_pos``, decoding returns to the step that chose response
token ``loc + 1`` and re-chooses it with every (beam, token) pair chosen there before forbidden, among each beam's
top ``n_can`` remaining tokens by the model's log-probability (no penalty at that step, as in the official
code); a position is returned to at most ``n_can`` times (then ``loc``, as in the official
code). The KV cache is not recomputed from the prompt: the rows of the restored beams are gathered from the
live cache, cropped to the longest prefix they share with a live beam, and only the missing response tokens
are fed again (tested equal to a cache built from scratch).

Speed. The candidates' attention rows come from one extra forward per step in which the ``n_can``
candidates of every beam are fed together against the shared KV cache, each seeing the cache and itself
only (an additive mask block; they share one position id); the cache is cropped back afterwards. The last
layer's rows are side-computed from its query/key projections, so every layer keeps SDPA. The official
code runs ``n_can`` full forwards per step and recomputes the whole prefix on every rollback.

Departures and choices, all parameters: ``eps`` (1e-7, the official constant), ``min_rollback_pos`` (10,
the official code never rolls back into the first 10 response tokens), ``max_rollbacks`` (per position,
default ``n_can``), ``rollback`` (on/off). The official code also rewards image attention during the first
10 response tokens instead of penalising; that step is not in the paper and not implemented here. Samples
of a batch are decoded one after another (each with its own beams, rollbacks and KV cache), so a batch
gives exactly the answers of its samples alone; ``num_beams=1`` is greedy decoding with the penalty.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from mmtoken.attention import llm_rows_against_cache
from mmtoken.config import PluginConfig, param
from mmtoken.models import eos_token_ids
from mmtoken.plugin import Plugin, register_plugin

# ---------------------------------------------------------------------------------------------------
# the algorithm as tensor functions


def column_penalty(window: Tensor, sigma: float, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Over-trust penalty of attention windows ``[..., T, T]`` (row ``i``: a response token's attention over
    the response columns, zero above the diagonal). Returns ``(max_c phi_c, argmax_c)`` with
    ``phi_c = eps * prod_{i >= c} sigma * w[i, c]``, the product taken as a float32 sum of logarithms."""
    w = window.float()
    t = w.shape[-1]
    lower = torch.ones(t, t, dtype=torch.bool, device=w.device).tril()
    logs = torch.log(w.clamp_min(0) * sigma).masked_fill(~lower, 0.0)  # log 0 = -inf: a column never attended to
    log_phi = logs.sum(-2) + torch.log(torch.tensor(eps, dtype=torch.float32))
    best, col = log_phi.max(-1)
    return best.clamp(max=80.0).exp(), col


def candidate_scores(logits: Tensor, log_probs: Tensor, candidates: Tensor, penalty: Tensor, alpha: float, renormalize: bool) -> Tensor:
    """Step scores ``[R, V]``: ``-inf`` outside each row's ``candidates`` ``[R, N]``; inside, the penalised
    score (see the module docstring)."""
    if renormalize:
        cand = torch.log_softmax(logits.gather(1, candidates).float() - alpha * penalty, dim=-1)
    else:
        cand = log_probs.gather(1, candidates) - alpha * penalty
    out = torch.full_like(log_probs, float("-inf"))
    return out.scatter(1, candidates, cand)


def aggregation_column(cols: Tensor) -> Tensor:
    """Per row of ``cols`` ``[R, N]`` (each candidate's argmax column), the most frequent one (ties: the
    smallest, as ``torch.mode``)."""
    return cols.mode(-1).values


def rollback_column(history: list[Tensor], r: int) -> int | None:
    """``history``: per step, each beam's aggregation column ``[R]``. The column to roll back to, or None:
    the most frequent column of the last step over the beams, if every beam's record holds it more than
    ``r`` times."""
    if not history:
        return None
    hist = torch.stack(history, dim=1)  # [R, S]
    loc = int(history[-1].mode().values)
    if bool(((hist == loc).sum(-1) > r).all()):
        return loc
    return None


# ---------------------------------------------------------------------------------------------------
# KV-cache surgery


def trim_cache(cache: Any, n: int) -> None:
    """Remove the last ``n`` positions from every layer (layers may hold different lengths)."""
    if n > 0:
        for layer in cache.layers:
            layer.crop(-n)


def select_rows(cache: Any, rows: Tensor) -> None:
    for layer in cache.layers:
        layer.batch_select_indices(rows.to(layer.keys.device))


def common_prefix(a: Tensor, b: Tensor) -> Tensor:
    """``[Ra, Rb]`` length of the common prefix of every row of ``a`` with every row of ``b`` (same width)."""
    eq = (a[:, None, :] == b[None, :, :]).long()
    return eq.cumprod(-1).sum(-1)


# ---------------------------------------------------------------------------------------------------
# the plugin


@dataclass
class OperaConfig(PluginConfig):
    num_beams: int = param(5, lo=1, doc="beams (1: greedy decoding with the penalty)")
    n_can: int = param(5, lo=1, doc="N_can: candidates per beam")
    sigma: float = param(50.0, lo=0.0, lo_open=True, doc="sigma: scale of the attention weights in the column product")
    alpha: float = param(1.0, lo=0.0, doc="alpha: weight of the over-trust penalty")
    r: int = param(15, lo=1, doc="rollback threshold: steps a column must win on every beam")
    rollback: bool = param(True, choices=(True, False), doc="retrospection on/off")
    renormalize: bool = param(True, choices=(True, False), doc="softmax over the candidates (paper) or the model's log-probs")
    eps: float = param(1e-7, lo=0.0, lo_open=True, doc="constant factor of the column product (official code)")
    min_rollback_pos: int = param(10, lo=0, doc="no rollback to a column before this response position")
    max_rollbacks: int = param(0, lo=0, doc="rollbacks per position (0: n_can)")


@dataclass
class _Snapshot:
    state: dict[str, Tensor]
    log_probs: Tensor  # the step's processed log-probs [R, V]
    chosen: list[Tensor] = field(default_factory=list)  # flat (beam * V + token) chosen at this step, over visits


@register_plugin
class OperaPlugin(Plugin):
    name = "opera"
    stages = ("decode", "attention")
    Config = OperaConfig
    compresses = False

    def __init__(self, config: OperaConfig):
        super().__init__(config)
        self._n_candidates = 0  # > 0 only during a candidate forward
        self._rows: Tensor | None = None  # last layer's candidate rows [R, N, keys]
        self._n_layers = 0
        self.last_rollbacks: list[int] = []  # per sample of the last generate call

    # -- attention stage: the candidate block mask and the last layer's rows -------------------------
    def attention_layers(self, n_layers: int) -> list[int]:
        self._n_layers = n_layers
        return list(range(n_layers))

    def attention_bias(self, layer: int, q_len: int, kv_len: int, ctx: dict[str, Any]) -> Tensor | None:
        n = self._n_candidates
        if n == 0 or ctx["run"].mode != "decode" or q_len != n:
            return None
        hidden = ctx["hidden"]
        bias = torch.zeros(1, 1, n, kv_len, device=hidden.device)
        block = ~torch.eye(n, dtype=torch.bool, device=hidden.device)
        bias[0, 0, :, kv_len - n :] = torch.zeros(n, n, device=hidden.device).masked_fill(block, float("-inf"))
        if layer == self._n_layers - 1:
            module, kw = ctx["module"], ctx["kwargs"]
            keys = kw["cache"].layers[layer].keys
            mask = ctx["mask"]
            if mask is None:
                mask = bias
            elif mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, device=hidden.device).masked_fill(~mask, float("-inf")) + bias
            else:
                mask = mask.float() + bias
            with torch.no_grad():
                normed = module.input_layernorm(hidden)
                probs = llm_rows_against_cache(module.self_attn, normed, kw["position_embeddings"], keys, mask)
            self._rows = probs.max(1).values  # [R, N, S + N]
        return bias

    # -- decode stage -----------------------------------------------------------------------------
    def wrap_generate(self, generate: Callable[..., Any], model: Any) -> Callable[..., Any]:
        plugin = self

        def opera_generate(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs.get("input_ids") is None or kwargs.get("do_sample") or kwargs.get("inputs_embeds") is not None:
                return generate(*args, **kwargs)
            return plugin.generate(model, **kwargs)

        return opera_generate

    @torch.no_grad()
    def generate(self, model: Any, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """OPERA beam search over every sample of the batch; returns ``[B, P + new]`` ids like ``generate``."""
        gc = copy.deepcopy(model.generation_config)
        for key in ("max_new_tokens", "min_new_tokens", "max_length", "length_penalty", "early_stopping", "eos_token_id", "pad_token_id"):
            if key in kwargs and kwargs[key] is not None:
                setattr(gc, key, kwargs.pop(key))
        as_dict = bool(kwargs.pop("return_dict_in_generate", False))
        want_logits = bool(kwargs.pop("output_logits", False))
        user_processors = kwargs.pop("logits_processor", None)
        for key in ("num_beams", "do_sample", "use_cache", "output_scores", "generation_config"):
            kwargs.pop(key, None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_id = model.config.image_token_id
        images_per_row = [_image_runs(row[m.bool()], image_id) for row, m in zip(input_ids, attention_mask)]
        pixel_values, image_sizes = kwargs.pop("pixel_values", None), kwargs.pop("image_sizes", None)
        outs, firsts, self.last_rollbacks = [], [], []
        handle = getattr(model, "_mmtoken_handle", None)
        merged = {"in": [], "out": [], "layers": {}}
        first_image = 0
        for b in range(input_ids.shape[0]):
            ids = input_ids[b, attention_mask[b].bool()][None]
            extra = dict(kwargs)
            n_img = images_per_row[b]
            if pixel_values is not None and n_img:
                extra["pixel_values"] = pixel_values[first_image : first_image + n_img]
                if image_sizes is not None:
                    extra["image_sizes"] = image_sizes[first_image : first_image + n_img]
            first_image += n_img
            new, n_back, first = self._search(model, gc, ids, extra, user_processors)
            outs.append(new)
            firsts.append(first)
            if handle is not None:  # the prefill's stats hold this sample's beams: keep its first beam
                st = handle.adapter.stats
                merged["in"] += st.image_tokens_in[:n_img]
                merged["out"] += st.image_tokens_out[:n_img]
                for layer, counts in st.llm_visual_tokens.items():
                    merged["layers"].setdefault(layer, []).append(counts[0])
            self.last_rollbacks.append(n_back)
        width = max(int(o.numel()) for o in outs)
        new_ids = torch.full((len(outs), width), _fill_id(gc), dtype=input_ids.dtype, device=input_ids.device)
        for b, o in enumerate(outs):
            new_ids[b, : o.numel()] = o
        sequences = torch.cat([input_ids, new_ids], dim=1)
        if handle is not None:
            st = handle.adapter.stats
            st.image_tokens_in, st.image_tokens_out, st.llm_visual_tokens = merged["in"], merged["out"], merged["layers"]
        if not as_dict:
            return sequences
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        return GenerateBeamDecoderOnlyOutput(sequences=sequences, logits=(torch.cat(firsts),) if want_logits else None)

    def _forward(self, model: Any, **kw: Any) -> Any:
        return model(**kw, use_cache=True, return_dict=True, logits_to_keep=1)

    def _search(self, model: Any, gc: Any, ids: Tensor, extra: dict[str, Any], user_processors: Any = None) -> tuple[Tensor, int, Tensor]:
        """Beam search for one sample ``ids`` ``[1, P]``; returns its new tokens, the number of rollbacks and
        the first step's logits ``[1, V]``."""
        from transformers.generation.logits_process import LogitsProcessorList

        cfg = self.config
        beams = cfg.num_beams
        dev = ids.device
        p = ids.shape[1]
        max_length = gc.max_length if gc.max_new_tokens is None else p + gc.max_new_tokens
        eos = eos_token_ids(gc)
        eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
        length_penalty = 1.0 if gc.length_penalty is None else gc.length_penalty
        early_stopping = False if gc.early_stopping is None else gc.early_stopping
        processors = model._get_logits_processor(
            generation_config=gc, input_ids_seq_length=p, encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(user_processors or []), device=dev, model_kwargs={},
        )
        max_back = cfg.max_rollbacks or cfg.n_can

        # state, as transformers' beam search keeps it (batch of one sample)
        running = torch.full((1, beams, max_length), _fill_id(gc), dtype=torch.long, device=dev)
        running[:, :, :p] = ids
        st = {
            "running": running, "sequences": running.clone(),
            "running_scores": torch.cat([torch.zeros(1, 1), torch.full((1, beams - 1), -1e9)], 1).to(dev),
            "scores": torch.full((1, beams), -1e9, device=dev),
            "finished": torch.zeros(1, beams, dtype=torch.bool, device=dev),
            "improvable": torch.ones(1, 1, dtype=torch.bool, device=dev),
            "running_idx": torch.full((1, beams, max_length - p), -1, dtype=torch.int32, device=dev),
        }
        st["idx"] = st["running_idx"].clone()
        n_keep = max(2, 1 + len(eos)) * beams
        top_mask = torch.cat([torch.ones(beams, dtype=torch.bool), torch.zeros(n_keep - beams, dtype=torch.bool)]).to(dev)

        out = self._forward(model, input_ids=ids.expand(beams, -1), attention_mask=torch.ones(beams, p, dtype=torch.long, device=dev),
                            **_expand(extra, beams))
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values  # the filled DynamicCache
        first = out.logits[:1, -1, :].float()
        att = torch.zeros(beams, 0, 0, device=dev)  # response rows over response columns, per beam
        loc_history: list[Tensor] = []
        snaps: dict[int, _Snapshot] = {}
        back_count: dict[int, int] = {}
        n_back = 0
        cur = p
        forced: Tensor | None = None  # flat indices forbidden at this step (after a rollback)
        replay: Tensor | None = None  # after a rollback: the snapshot's log-probs, already processed
        while True:
            k = cur - p  # response tokens so far; the cache holds prompt + k of them
            flat = st["running"][0, :, :cur]
            if replay is None:
                logits = out.logits[:, -1, :].float()
                log_probs = processors(flat, torch.log_softmax(logits, dim=-1))
            else:  # no new forward: logits are only read for fresh steps
                logits, log_probs, replay = replay, replay, None
            vocab = log_probs.shape[-1]
            fresh = forced is None
            base = log_probs
            if not fresh:  # re-choosing after a rollback: no penalty, earlier choices forbidden
                base = log_probs.clone().view(-1)
                base[forced] = float("-inf")
                base = base.view(beams, vocab)
                forced = None
            n = min(cfg.n_can, vocab)
            cands = torch.topk(base, n, dim=-1).indices  # [R, N]
            rows = self._candidate_rows(model, cache, cands, cur, k)  # [R, N, k + 1]
            if not fresh:
                step = torch.full_like(base, float("-inf")).scatter(1, cands, base.gather(1, cands))
            else:
                window = _window(att, rows)  # [R, N, k + 1, k + 1]
                penalty, cols = column_penalty(window, cfg.sigma, cfg.eps)
                step = candidate_scores(logits, log_probs, cands, penalty, cfg.alpha, cfg.renormalize)
                snaps[k] = _Snapshot({key: v.clone() for key, v in st.items()} | {"att": att, "n_hist": torch.tensor(len(loc_history))}, log_probs)
                loc_history.append(aggregation_column(cols))
                loc = rollback_column(loc_history, cfg.r) if cfg.rollback else None
                if loc is not None and loc >= cfg.min_rollback_pos:
                    target = loc + 1
                    if back_count.get(target, 0) >= max_back:
                        target = loc
                    if back_count.get(target, 0) < max_back and target in snaps and target < k:
                        back_count[target] = back_count.get(target, 0) + 1
                        n_back += 1
                        snap = snaps[target]
                        st = {key: v.clone() for key, v in snap.state.items() if key not in ("att", "n_hist")}
                        att = snap.state["att"]
                        del loc_history[int(snap.state["n_hist"]) :]
                        for j in [j for j in snaps if j > target]:
                            del snaps[j]
                        cur = p + target
                        self._restore_cache(model, cache, st["running"][0, :, :cur], flat)
                        forced = torch.cat(snap.chosen) if snap.chosen else torch.empty(0, dtype=torch.long, device=dev)
                        replay = snap.log_probs
                        continue
            acc = (step + st["running_scores"][0][:, None]).reshape(1, -1)
            topk_scores, topk_seq, topk_idx = model._get_top_k_continuations(
                accumulated_log_probs=acc, running_sequences=st["running"], running_beam_indices=st["running_idx"],
                cur_len=cur, decoder_prompt_len=p, do_sample=False, beams_to_keep=n_keep, num_beams=beams, batch_size=1,
            )
            new_tok = topk_seq[0, :, cur]
            hits = (new_tok[None] == eos_t[:, None]).any(0) if eos else torch.zeros_like(new_tok, dtype=torch.bool)
            hits = (hits | (cur + 1 >= max_length))[None]
            st["running"], st["running_scores"], st["running_idx"] = model._get_running_beams_for_next_iteration(
                topk_log_probs=topk_scores, topk_running_sequences=topk_seq, topk_running_beam_indices=topk_idx,
                next_token_hits_stopping_criteria=hits, num_beams=beams,
            )
            st["sequences"], st["scores"], st["idx"], st["finished"] = model._update_finished_beams(
                sequences=st["sequences"], topk_running_sequences=topk_seq, beam_scores=st["scores"], topk_log_probs=topk_scores,
                beam_indices=st["idx"], topk_running_beam_indices=topk_idx, is_early_stop_heuristic_unsatisfied=st["improvable"],
                is_sent_finished=st["finished"], next_token_hits_stopping_criteria=hits, top_num_beam_mask=top_mask,
                num_beams=beams, cur_len=cur, decoder_prompt_len=p, length_penalty=length_penalty, early_stopping=early_stopping,
            )
            parent = st["running_idx"][0, :, k].long()  # beam each new running row continues
            token = st["running"][0, :, cur]
            if k in snaps:
                snaps[k].chosen.append(parent * vocab + token)
            which = (cands[parent] == token[:, None]).float().argmax(-1)
            new_rows = rows[parent, which]  # [R, k + 1]
            att = _window(att[parent], new_rows[:, None])[:, 0]
            cache.reorder_cache(parent)
            cur += 1
            st["improvable"] = model._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=st["improvable"], running_beam_scores=st["running_scores"],
                beam_scores=st["scores"], is_sent_finished=st["finished"], cur_len=cur, max_length=max_length,
                decoder_prompt_len=p, early_stopping=early_stopping, length_penalty=length_penalty,
            )
            if not bool(model._beam_search_has_unfinished_sequences(st["improvable"], st["finished"], hits, early_stopping)):
                break
            out = self._forward(model, input_ids=st["running"][0, :, cur - 1 : cur], attention_mask=torch.ones(beams, cur, dtype=torch.long, device=dev),
                                cache=cache)
        best = st["sequences"][0, 0]
        n_new = int((st["idx"][0, 0] >= 0).sum())
        return best[p : p + n_new], n_back, first

    def _candidate_rows(self, model: Any, cache: Any, cands: Tensor, cur: int, k: int) -> Tensor:
        """Last-layer attention rows ``[R, N, k + 1]`` of each beam's candidates over the response columns
        (the ``k`` generated tokens, then the candidate itself); the cache is left as it was."""
        r, n = cands.shape
        self._n_candidates, self._rows = n, None
        try:
            self._forward(model, input_ids=cands, attention_mask=torch.ones(r, cur + n, dtype=torch.long, device=cands.device),
                          position_ids=torch.full((r, n), cur, dtype=torch.long, device=cands.device), cache=cache)
        finally:
            self._n_candidates = 0
            trim_cache(cache, n)
        rows = self._rows
        if rows is None:
            raise RuntimeError("opera: the last decoder layer's attention rows were not captured")
        s = rows.shape[-1] - n  # cached keys at the last layer
        own = rows[..., s:].diagonal(dim1=-2, dim2=-1)  # [R, N]
        return torch.cat([rows[..., s - k : s], own[..., None]], dim=-1)

    def _restore_cache(self, model: Any, cache: Any, target: Tensor, live: Tensor) -> None:
        """Make ``cache`` hold the sequences ``target`` ``[R, T]`` from the live cache of ``live`` ``[R, L]``:
        gather the live row sharing the longest prefix with each target row, crop all rows to the shortest
        such prefix, and feed the target tokens after it."""
        want = target.shape[1]  # tokens the cache must hold
        have = live.shape[1]
        width = min(want, have)
        shared = common_prefix(target[:, :width], live[:, :width])  # [R, R]
        best, rows = shared.max(-1)
        m = int(best.min())
        select_rows(cache, rows)
        trim_cache(cache, have - m)
        if m < want:
            r = target.shape[0]
            self._forward(model, input_ids=target[:, m:want], attention_mask=torch.ones(r, want, dtype=torch.long, device=target.device),
                          cache=cache)


def _fill_id(gc: Any) -> int:
    """What transformers' beam search pads finished sequences with (``pad_token_id or eos[0]``)."""
    eos = eos_token_ids(gc)
    return (gc.pad_token_id or eos[0]) if eos else -1


def _window(att: Tensor, rows: Tensor) -> Tensor:
    """Per beam, the response window ``[R, N, T + 1, T + 1]``: the stored rows ``att`` ``[R, T, T]`` (a zero
    column for the new token) under each candidate's row ``rows`` ``[R, N, T + 1]``."""
    r, t, _ = att.shape
    n = rows.shape[1]
    top = torch.cat([att, torch.zeros(r, t, 1, device=att.device, dtype=att.dtype)], dim=-1)
    top = top[:, None].expand(r, n, t, t + 1)
    return torch.cat([top, rows[:, :, None, :].to(att.dtype)], dim=2)


def _image_runs(row: Tensor, image_id: int) -> int:
    m = (row == image_id).long()
    return int(((m[1:] - m[:-1]) == 1).sum()) + int(m[0]) if m.numel() else 0


def _expand(extra: dict[str, Any], beams: int) -> dict[str, Any]:
    out = {}
    for key, v in extra.items():
        if torch.is_tensor(v) and key in ("pixel_values", "image_sizes"):
            out[key] = v.repeat_interleave(beams, dim=0)
        else:
            out[key] = v
    return out
