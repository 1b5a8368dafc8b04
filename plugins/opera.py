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
code). The KV cache is not recomputed from the prompt: each restored beam's row is gathered from the live
row sharing the longest prefix with it, the response columns after the shortest such prefix become holes
(masked out for good), and only the missing response tokens are fed again (tested: the columns attended to
then equal a cache built from scratch, and so does the next token's output).

Speed. Every beam of every sample of the batch lives in one KV cache and advances together; each sample
keeps its own beams, history and rollbacks, and a sample that rolls back leaves holes in its rows instead
of making the others wait or shrink (positions are passed explicitly, so holes shift nothing). The images
are encoded once per sample and their features repeated for the beams, as in transformers' beam search.
One forward per step feeds the ``n_can`` candidates of every beam against the cache, each seeing the
cache and itself only (an additive mask block; they share one position id), which is exactly the step
forward each candidate would get if chosen: it gives the candidates' attention rows *and* the next
logits, and the cache keeps only the chosen candidate's column, so a step costs one forward of ``n_can``
tokens per beam and no second forward for the chosen token. The last layer's rows are side-computed from
its query/key projections, so every layer keeps SDPA. The official code runs ``n_can`` full forwards
per step, batch size 1, and recomputes the whole prefix on every rollback.

Departures and choices, all parameters: ``eps`` (1e-7, the official constant), ``min_rollback_pos`` (10,
the official code never rolls back into the first 10 response tokens), ``max_rollbacks`` (per position,
default ``n_can``), ``rollback`` (on/off). The official code also rewards image attention during the first
10 response tokens instead of penalising; that step is not in the paper and not implemented here. A batch
gives the answers of its samples decoded alone (tested, rollbacks included); ``num_beams=1`` is greedy
decoding with the penalty. "Exactly" above is tested on the CPU; on a GPU the candidate forward may use
other attention kernels than a one-token step, so equality holds up to their rounding.

Costs to know. Snapshots (each beam's state and the step's log-probabilities over the vocabulary) are kept
for every step a rollback can return to (``k >= min_rollback_pos``; none with ``rollback=False``), for
every sample of the batch at once. Samples that finished, and columns left by rollbacks, keep their rows
in the batch's forwards until the whole batch is done. The per-sample bookkeeping reads a few flags back
from the device every step. User logits processors are called per sample (with that sample's beams as
the batch), not on a replayed step after a rollback.
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


def common_prefix(a: Tensor, b: Tensor) -> Tensor:
    """``[Ra, Rb]`` length of the common prefix of every row of ``a`` with every row of ``b`` (same width)."""
    eq = (a[:, None, :] == b[None, :, :]).long()
    return eq.cumprod(-1).sum(-1)


def restore_plan(restored: Tensor, live: Tensor) -> tuple[Tensor, int]:
    """How a cache holding the sequences ``live`` ``[R, L]`` comes to hold ``restored`` ``[R, T]`` (``T <= L``):
    row ``i`` takes the live row ``rows[i]`` sharing the longest prefix with it; the first ``m`` tokens (the
    shortest such prefix) are then right for every row, and the tokens after them must be fed again."""
    best, rows = common_prefix(restored, live[:, : restored.shape[1]]).max(-1)
    return rows, int(best.min())


def keep_candidate(cache: Any, perm: Tensor, pick: Tensor, n: int) -> None:
    """After a candidate forward (``n`` candidate columns at the end of every layer): row ``i`` becomes row
    ``perm[i]`` followed by that row's candidate ``pick[i]`` only, so the step needs no forward of its own.
    In place: only the rows whose parent is another row are copied."""
    rows = torch.arange(perm.shape[0], device=perm.device)
    moved = (perm != rows).nonzero().flatten()
    for layer in cache.layers:
        s = layer.keys.shape[-2] - n
        for name in ("keys", "values"):
            t = getattr(layer, name)
            dev = t.device
            chosen = t[perm.to(dev), :, s + pick.to(dev)]  # [R, H, d], read before any row is overwritten
            if moved.numel():
                t[moved.to(dev), :, :s] = t[perm[moved].to(dev), :, :s]
            t[:, :, s] = chosen
            setattr(layer, name, t[:, :, : s + 1])


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


class _SharedCache:
    """The KV cache of every beam of every sample of a batch, and the columns each row may attend to.

    Columns: the left-padded prompts (``prompt_mask``), then the ``extra`` columns appended by the forwards
    after the prefill. A sample's response tokens are the extra columns listed in its ``cols``; any other
    extra column of its rows is a hole that nothing attends to: the left padding of a forward that fed the
    rows unequal numbers of tokens, or the tokens a rollback abandoned. Positions are passed explicitly, so
    a hole shifts nothing."""

    def __init__(self, cache: Any, prompt_mask: Tensor):
        self.cache = cache
        self.prompt_mask = prompt_mask.bool()
        self.extra = torch.zeros(prompt_mask.shape[0], 0, dtype=torch.bool, device=prompt_mask.device)

    @property
    def n_rows(self) -> int:
        return self.prompt_mask.shape[0]

    def crop(self, sample: Any, n: int) -> None:
        """Keep the first ``n`` response tokens of ``sample`` (its ``rows``, ``cols``); the rest become holes."""
        dropped = sample.cols[n:]
        if dropped.numel():
            self.extra[sample.rows[:, None], dropped[None, :]] = False
        sample.cols = sample.cols[:n]

    def mask(self, new: Tensor) -> Tensor:
        """The 2-D attention mask of a forward feeding the columns ``new`` ``[R, W]`` (True: a real token)."""
        return torch.cat([self.prompt_mask, self.extra, new.bool()], dim=1).long()


class _Beams:
    """One sample's OPERA beam search: transformers' beam-search state for a batch of one, every beam's
    response attention window, the aggregation-column history, and the snapshots a rollback returns to.
    ``rows`` are the sample's rows in the ``shared`` cache, one per beam."""

    def __init__(self, model: Any, gc: Any, cfg: OperaConfig, ids: Tensor, new_tokens: int, shared: _SharedCache, rows: Tensor,
                 processors: Any):
        dev = ids.device
        beams = cfg.num_beams
        self.model, self.cfg, self.shared, self.rows, self.processors = model, cfg, shared, rows, processors
        self.p = p = ids.shape[1]
        self.max_length = p + new_tokens
        eos = eos_token_ids(gc)
        self.eos = torch.tensor(eos, device=dev, dtype=torch.long)
        self.length_penalty = 1.0 if gc.length_penalty is None else gc.length_penalty
        self.early_stopping = False if gc.early_stopping is None else gc.early_stopping
        self.max_back = cfg.max_rollbacks or cfg.n_can
        running = torch.full((1, beams, self.max_length), _fill_id(gc), dtype=torch.long, device=dev)
        running[:, :, :p] = ids
        self.st = {
            "running": running, "sequences": running.clone(),
            "running_scores": torch.cat([torch.zeros(1, 1), torch.full((1, beams - 1), -1e9)], 1).to(dev),
            "scores": torch.full((1, beams), -1e9, device=dev),
            "finished": torch.zeros(1, beams, dtype=torch.bool, device=dev),
            "improvable": torch.ones(1, 1, dtype=torch.bool, device=dev),
            "running_idx": torch.full((1, beams, new_tokens), -1, dtype=torch.int32, device=dev),
        }
        self.st["idx"] = self.st["running_idx"].clone()
        self.n_keep = max(2, 1 + len(eos)) * beams
        self.top_mask = torch.cat([torch.ones(beams, dtype=torch.bool), torch.zeros(self.n_keep - beams, dtype=torch.bool)]).to(dev)
        self.att = torch.zeros(beams, 0, 0, device=dev)  # response rows over response columns, per beam
        self.loc_history: list[Tensor] = []
        self.snaps: dict[int, _Snapshot] = {}
        self.back_count: dict[int, int] = {}
        self.n_back = 0
        self.cur = p  # prompt + response tokens; the cache holds all of them
        self.cols = torch.zeros(0, dtype=torch.long, device=dev)  # the response tokens' extra columns
        self.logits: Tensor | None = None  # next-token logits [beams, V] from the last forward
        self.forced: Tensor | None = None  # flat indices forbidden at this step (after a rollback)
        self.replay: Tensor | None = None  # after a rollback: the snapshot's log-probs, already processed
        self.done = False
        self._step: tuple | None = None

    def propose(self, n: int) -> Tensor:
        """Each beam's ``n`` candidates ``[beams, n]`` for the next token."""
        flat = self.st["running"][0, :, : self.cur]
        if self.replay is None:
            logits = self.logits.float()
            log_probs = self.processors(flat, torch.log_softmax(logits, dim=-1))
        else:  # no new forward: logits are only read for fresh steps
            logits = log_probs = self.replay
            self.replay = None
        fresh = self.forced is None
        base = log_probs
        if not fresh:  # re-choosing after a rollback: no penalty, earlier choices forbidden
            base = log_probs.clone().view(-1)
            base[self.forced] = float("-inf")
            base = base.view(log_probs.shape)
            self.forced = None
        cands = torch.topk(base, min(n, base.shape[-1]), dim=-1).indices
        self._step = (logits, log_probs, base, fresh, cands, flat)
        return cands

    def decide(self, rows: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Choose the step's tokens from the candidates' attention rows ``[beams, n, k + 1]`` over the response
        columns, or roll back. Returns the beam each cache row must now hold (a local row index per beam), the
        candidate each row keeps (its index among the parent row's candidates; None: none, after a rollback or
        at the end) and the tokens ``[beams, w]`` the cache must be fed again after a rollback."""
        cfg, model, st = self.cfg, self.model, self.st
        logits, log_probs, base, fresh, cands, flat = self._step
        beams, vocab = log_probs.shape
        p, k = self.p, self.cur - self.p
        if not fresh:
            step = torch.full_like(base, float("-inf")).scatter(1, cands, base.gather(1, cands))
        else:
            window = _window(self.att, rows)  # [beams, n, k + 1, k + 1]
            penalty, cols = column_penalty(window, cfg.sigma, cfg.eps)
            step = candidate_scores(logits, log_probs, cands, penalty, cfg.alpha, cfg.renormalize)
            if cfg.rollback and k >= cfg.min_rollback_pos:  # only a step a rollback can return to needs a snapshot
                state = {key: v.clone() for key, v in st.items()} | {"att": self.att, "n_hist": torch.tensor(len(self.loc_history))}
                self.snaps[k] = _Snapshot(state, log_probs)
            self.loc_history.append(aggregation_column(cols))
            loc = rollback_column(self.loc_history, cfg.r) if cfg.rollback else None
            if loc is not None and loc >= cfg.min_rollback_pos:
                target = loc + 1
                if self.back_count.get(target, 0) >= self.max_back:
                    target = loc
                if self.back_count.get(target, 0) < self.max_back and target in self.snaps and target < k:
                    return self._roll_back(target, flat)
        acc = (step + st["running_scores"][0][:, None]).reshape(1, -1)
        cur = self.cur
        topk_scores, topk_seq, topk_idx = model._get_top_k_continuations(
            accumulated_log_probs=acc, running_sequences=st["running"], running_beam_indices=st["running_idx"],
            cur_len=cur, decoder_prompt_len=p, do_sample=False, beams_to_keep=self.n_keep, num_beams=beams, batch_size=1,
        )
        new_tok = topk_seq[0, :, cur]
        hits = (new_tok[None] == self.eos[:, None]).any(0) if self.eos.numel() else torch.zeros_like(new_tok, dtype=torch.bool)
        hits = (hits | (cur + 1 >= self.max_length))[None]
        st["running"], st["running_scores"], st["running_idx"] = model._get_running_beams_for_next_iteration(
            topk_log_probs=topk_scores, topk_running_sequences=topk_seq, topk_running_beam_indices=topk_idx,
            next_token_hits_stopping_criteria=hits, num_beams=beams,
        )
        st["sequences"], st["scores"], st["idx"], st["finished"] = model._update_finished_beams(
            sequences=st["sequences"], topk_running_sequences=topk_seq, beam_scores=st["scores"], topk_log_probs=topk_scores,
            beam_indices=st["idx"], topk_running_beam_indices=topk_idx, is_early_stop_heuristic_unsatisfied=st["improvable"],
            is_sent_finished=st["finished"], next_token_hits_stopping_criteria=hits, top_num_beam_mask=self.top_mask,
            num_beams=beams, cur_len=cur, decoder_prompt_len=p, length_penalty=self.length_penalty, early_stopping=self.early_stopping,
        )
        parent = st["running_idx"][0, :, k].long()  # beam each new running row continues
        token = st["running"][0, :, cur]
        if k in self.snaps:
            self.snaps[k].chosen.append(parent * vocab + token)
        which = (cands[parent] == token[:, None]).float().argmax(-1)
        self.att = _window(self.att[parent], rows[parent, which][:, None])[:, 0]
        self.cur = cur = cur + 1
        st["improvable"] = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=st["improvable"], running_beam_scores=st["running_scores"],
            beam_scores=st["scores"], is_sent_finished=st["finished"], cur_len=cur, max_length=self.max_length,
            decoder_prompt_len=p, early_stopping=self.early_stopping, length_penalty=self.length_penalty,
        )
        self.done = not bool(model._beam_search_has_unfinished_sequences(st["improvable"], st["finished"], hits, self.early_stopping))
        return parent, None if self.done else which, token.new_empty(beams, 0)

    def _roll_back(self, target: int, live: Tensor) -> tuple[Tensor, None, Tensor]:
        """Return to the step that chose response token ``target``: restore its state; each restored beam's
        cache row is gathered from the live row ``live`` ``[beams, cur]`` sharing the longest prefix with it;
        the response columns past the shortest such prefix become holes and the restored tokens after it are
        fed again."""
        self.back_count[target] = self.back_count.get(target, 0) + 1
        self.n_back += 1
        snap = self.snaps[target]
        self.st = {key: v.clone() for key, v in snap.state.items() if key not in ("att", "n_hist")}
        self.att = snap.state["att"]
        del self.loc_history[int(snap.state["n_hist"]) :]
        for j in [j for j in self.snaps if j > target]:
            del self.snaps[j]
        self.cur = self.p + target
        restored = self.st["running"][0, :, : self.cur]
        rows, m = restore_plan(restored, live)  # m >= p: every beam shares the prompt
        self.shared.crop(self, m - self.p)
        self.forced = torch.cat(snap.chosen) if snap.chosen else torch.empty(0, dtype=torch.long, device=live.device)
        self.replay = snap.log_probs
        return rows, None, restored[:, m:]

    def result(self) -> Tensor:
        """The best finished sequence's new tokens."""
        n_new = int((self.st["idx"][0, 0] >= 0).sum())
        return self.st["sequences"][0, 0, self.p : self.p + n_new]


@register_plugin
class OperaPlugin(Plugin):
    name = "opera"
    stages = ("decode", "attention")
    Config = OperaConfig
    compresses = False
    shapes_attention = True  # the candidate block: other attention plugins must see it

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
        """OPERA beam search over every sample of the batch at once; returns ``[B, P + new]`` ids like
        ``generate``."""
        from transformers.generation.logits_process import LogitsProcessorList

        cfg = self.config
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
        new_tokens = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - input_ids.shape[1]
        if new_tokens < 1:
            raise ValueError(f"opera: nothing to generate (max_length {gc.max_length} <= prompt length {input_ids.shape[1]})")
        beams, dev = cfg.num_beams, input_ids.device
        prompts = [row[m.bool()] for row, m in zip(input_ids, attention_mask)]
        pad = max(_fill_id(gc), 0)

        # every beam of every sample in one left-padded batch; images are encoded once per sample, as
        # transformers' beam search does, and their features repeated for the beams
        width = max(int(q.numel()) for q in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=input_ids.dtype, device=dev)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=dev)
        for b, q in enumerate(prompts):
            ids[b, width - q.numel() :], mask[b, width - q.numel() :] = q, 1
        model_kwargs = model._maybe_prepare_encoder_kwargs_for_generation(ids, dict(kwargs, attention_mask=mask), "input_ids", gc)
        ids, model_kwargs = model._expand_inputs_for_generation(expand_size=beams, input_ids=ids, **model_kwargs)
        mask = model_kwargs.pop("attention_mask")
        n_rows = ids.shape[0]
        out = self._forward(model, input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), **model_kwargs)
        shared = _SharedCache(out.cache if getattr(out, "cache", None) is not None else out.past_key_values, mask)
        handle = getattr(model, "_mmtoken_handle", None)
        if handle is not None:  # the prefill's stats hold every beam: keep each sample's first
            _first_beam_stats(handle.adapter.stats, [_image_runs(q, model.config.image_token_id) for q in prompts], beams)
        samples = []
        for b, q in enumerate(prompts):
            processors = model._get_logits_processor(
                generation_config=gc, input_ids_seq_length=q.numel(), encoder_input_ids=q[None], prefix_allowed_tokens_fn=None,
                logits_processor=LogitsProcessorList(user_processors or []), device=dev, model_kwargs={},
            )
            s = _Beams(model, gc, cfg, q[None], new_tokens, shared, torch.arange(b * beams, (b + 1) * beams, device=dev), processors)
            s.logits = out.logits[s.rows, -1]
            samples.append(s)
        firsts = [out.logits[b * beams : b * beams + 1, -1].float() for b in range(len(prompts))]
        n = min(cfg.n_can, out.logits.shape[-1])

        while not all(s.done for s in samples):
            active = [s for s in samples if not s.done]
            cands = torch.full((n_rows, n), pad, dtype=torch.long, device=dev)
            pos = torch.zeros(n_rows, dtype=torch.long, device=dev)
            for s in active:
                cands[s.rows] = s.propose(n)
                pos[s.rows] = s.cur
            out, rows = self._candidates(model, shared, cands, pos)  # rows: [R, n, S + n]
            start = rows.shape[-1] - n - shared.extra.shape[1]  # the first extra column of the last layer's keys
            perm = torch.arange(n_rows, device=dev)
            pick = torch.zeros(n_rows, dtype=torch.long, device=dev)
            kept = torch.zeros(n_rows, dtype=torch.bool, device=dev)
            feeds = []
            for s in active:
                r = rows[s.rows]
                own = r[..., -n:].diagonal(dim1=-2, dim2=-1)  # [beams, n]
                local, which, again = s.decide(torch.cat([r[..., start + s.cols], own[..., None]], dim=-1))
                perm[s.rows] = s.rows[local]
                if which is not None:  # the chosen candidate's forward was the step's forward
                    pick[s.rows], kept[s.rows] = which, True
                    s.logits = out.logits[s.rows[local], which]
                    s.cols = torch.cat([s.cols, torch.full((1,), shared.extra.shape[1], dtype=torch.long, device=dev)])
                feeds.append((s, again))
            keep_candidate(shared.cache, perm, pick, n)
            shared.extra = torch.cat([shared.extra, kept[:, None]], dim=1)
            self._feed(model, shared, feeds, pad)  # after rollbacks; their next logits are the snapshot's

        self.last_rollbacks = [s.n_back for s in samples]
        outs = [s.result() for s in samples]
        width = max(int(o.numel()) for o in outs)
        new_ids = torch.full((len(outs), width), _fill_id(gc), dtype=input_ids.dtype, device=dev)
        for b, o in enumerate(outs):
            new_ids[b, : o.numel()] = o
        sequences = torch.cat([input_ids, new_ids], dim=1)
        if not as_dict:
            return sequences
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

        return GenerateBeamDecoderOnlyOutput(sequences=sequences, logits=(torch.cat(firsts),) if want_logits else None)

    def _forward(self, model: Any, logits_to_keep: int = 1, **kw: Any) -> Any:
        return model(**kw, use_cache=True, return_dict=True, logits_to_keep=logits_to_keep)

    def _candidates(self, model: Any, shared: _SharedCache, cands: Tensor, pos: Tensor) -> tuple[Any, Tensor]:
        """Feed every row's candidates ``[R, n]`` at once, each at the row's next position ``pos`` ``[R]`` and
        seeing the row's cache and itself only: exactly the step forward each would get if chosen. Returns the
        output (logits ``[R, n, V]``) and the candidates' last-layer attention rows ``[R, n, S + n]`` over the
        ``S`` cached keys and the candidates; the cache keeps the candidates' keys and values (see
        ``keep_candidate``)."""
        r, n = cands.shape
        self._n_candidates, self._rows = n, None
        try:
            out = self._forward(model, n, input_ids=cands, attention_mask=shared.mask(torch.ones(r, n, dtype=torch.bool, device=cands.device)),
                                position_ids=pos[:, None].expand(r, n), cache=shared.cache)
        finally:
            self._n_candidates = 0
        if self._rows is None:
            raise RuntimeError("opera: the last decoder layer's attention rows were not captured")
        return out, self._rows

    def _feed(self, model: Any, shared: _SharedCache, feeds: list[tuple[_Beams, Tensor]], pad: int) -> Any | None:
        """One forward appending each sample's tokens ``[beams, w]`` to its rows (after ``W - w`` holes, ``W`` the
        widest feed; rows fed nothing get ``W`` holes). Returns the output, whose logits are each row's last
        column's, or None when nothing is fed."""
        w_max = max((int(t.shape[1]) for _, t in feeds), default=0)
        if w_max == 0:
            return None
        dev = shared.prompt_mask.device
        ids = torch.full((shared.n_rows, w_max), pad, dtype=torch.long, device=dev)
        new = torch.zeros(shared.n_rows, w_max, dtype=torch.bool, device=dev)
        pos = torch.zeros(shared.n_rows, w_max, dtype=torch.long, device=dev)
        first = shared.extra.shape[1]
        for s, tokens in feeds:
            w = int(tokens.shape[1])
            if w == 0:
                continue
            ids[s.rows, w_max - w :] = tokens
            new[s.rows, w_max - w :] = True
            pos[s.rows, w_max - w :] = s.p + s.cols.numel() + torch.arange(w, device=dev)
            s.cols = torch.cat([s.cols, first + w_max - w + torch.arange(w, device=dev)])
        out = self._forward(model, input_ids=ids, attention_mask=shared.mask(new), position_ids=pos, cache=shared.cache)
        shared.extra = torch.cat([shared.extra, new], dim=1)
        return out


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


def _first_beam_stats(stats: Any, images: list[int], beams: int) -> None:
    """Reduce the prefill's statistics, taken over every beam row, to one row (the first beam) per sample."""
    keep, first = [], 0
    for n in images:
        keep += range(first, first + n)
        first += n * beams
    stats.image_tokens_in = [stats.image_tokens_in[i] for i in keep]
    stats.image_tokens_out = [stats.image_tokens_out[i] for i in keep]
    stats.llm_visual_tokens = {layer: counts[::beams] for layer, counts in stats.llm_visual_tokens.items()}
