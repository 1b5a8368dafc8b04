"""Adapters for Hugging Face ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``.

An adapter knows where each stage lives in its architecture and installs per-instance, reversible hooks:

* ``vision``: the forward of chosen ViT encoder layers is replaced on the instance by one that runs the
  same attention (plus proportional attention ``log(size)`` as an additive mask) and MLP, with the
  plugin's merge in between; merge sizes and each token's first patch are tracked.
* ``visual``: ``get_image_features`` is wrapped on the instance to capture the CLS attention / keys of the
  requested ViT layers; the base model's ``forward`` is wrapped to let plugins select per image, then
  rewrite the sequence (placeholders per sample, padding, position ids) so the LLM really receives fewer
  tokens — exactly what a model simply fed the kept tokens would see.
* ``llm`` / ``attention``: forward pre-hooks on the decoder layers gather hidden states, ``(cos, sin)``,
  position ids and the mask to the kept positions (original position ids are kept, as in FastV), and add
  attention biases. Later layers hold shorter KV caches; decode steps gather the mask's key columns.

Image tokens are found from ``config.image_token_id``; each image is one contiguous run of placeholders.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..attention import llm_attention_rows, vit_cls_attention
from ..errors import CompositionError, MmtokenError
from ..plugin import LLMContext, LLMDrop, Plugin, VisionContext
from ..tokens import Selection, VisualRequest, VisualTokens


# ---------------------------------------------------------------------------------------------------
# small tensor helpers


def placeholder_runs(ids_row: Tensor, token_id: int) -> list[tuple[int, int]]:
    """``[(start, length), ...]`` of the contiguous runs of ``token_id`` in a 1-D id tensor."""
    m = (ids_row == token_id).to(torch.int8)
    if not bool(m.any()):
        return []
    d = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def pad_index_lists(lists: list[Tensor], side: str = "left") -> tuple[Tensor, Tensor]:
    """Stack index lists of different lengths into ``[B, Lmax]``; returns ``(index, dummy)`` where dummy
    slots (padding, on ``side``) repeat a valid index and are flagged True."""
    lmax = max(int(x.numel()) for x in lists)
    device = lists[0].device
    idx = torch.zeros(len(lists), lmax, dtype=torch.long, device=device)
    dummy = torch.zeros(len(lists), lmax, dtype=torch.bool, device=device)
    for b, x in enumerate(lists):
        n = int(x.numel())
        fill = x[0] if n else torch.zeros((), dtype=torch.long, device=device)
        if side == "left":
            idx[b, : lmax - n] = fill
            idx[b, lmax - n :] = x
            dummy[b, : lmax - n] = True
        else:
            idx[b, :n] = x
            idx[b, n:] = fill
            dummy[b, n:] = True
    return idx, dummy


def gather_seq(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, j], ...]`` for ``x`` of shape ``[B or 1, L, ...]``."""
    x = x.expand(idx.shape[0], *x.shape[1:])
    shape = idx.shape + x.shape[2:]
    view = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, view)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean ``allowed`` -> float mask with 0 where allowed and the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


# ---------------------------------------------------------------------------------------------------
# state


@dataclass
class LayerPlan:
    """Which LLM-input positions a decoder layer holds in its KV cache (``None`` = all of them)."""

    idx: Tensor | None
    dummy: Tensor | None
    any_dummy: bool = True  # whether ``dummy`` has a True entry (known on the host, so no sync per decode step)


@dataclass
class SeqPlan:
    """What a prefill did to the sequence, kept for the decode steps that continue its cache."""

    orig_len: int  # length of the attention mask generate() keeps (original placeholders)
    new_mask: Tensor  # [B, L0] mask of the sequence the LLM really received
    shift: Tensor  # [B] original real tokens minus received real tokens
    original_ids: bool = False  # positions=original: decode keeps generate()'s position ids (no shift)
    layers: dict[int, LayerPlan] = field(default_factory=dict)
    image_mask: Tensor | None = None  # [B, L0] which received positions are visual tokens


@dataclass
class RunState:
    """State of one forward pass through the LLM."""

    mode: str  # "prefill" | "decode" | "off"
    image_mask: Tensor | None = None  # [B, L0]
    valid: Tensor | None = None  # [B, L0]
    idx: Tensor | None = None  # [B, L'] current positions (LLM-input coordinates)
    dummy: Tensor | None = None  # [B, L']
    plan: SeqPlan | None = None
    rows: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (probs mean, queries)
    step_mask2d: Tensor | None = None  # decode: the 2D mask of this step (LLM coordinates)
    counts: dict[int, Tensor | None] = field(default_factory=dict)  # layer -> visual tokens per sample where
    # the sequence changed (None: as the layer before); read on the host once, after the pass
    any_dummy: bool = False  # whether ``dummy`` has a True entry
    mask_cache: tuple | None = None  # (idx, dtype, mask): layers between two drops share one mask
    kept: dict[int, Tensor] = field(default_factory=dict)  # drop layer -> [B, L0] kept positions
    memo: "Memo | None" = None


@dataclass
class Memo:
    """The LLM-stage decisions of the last prefill. Generation without a KV cache re-runs the prefill on
    the prompt plus the tokens generated so far; the decisions taken on the prompt are reused for it (the
    new tokens are kept), so decoding with and without the cache gives the same tokens. A memo lives for
    one ``generate(use_cache=False)`` call only: it is made and read only inside such a call, and dropped
    when the call starts and ends, so no later call (a second chat turn, another image) inherits it."""

    ids: Tensor
    kept: dict[int, Tensor]


@dataclass
class VisionState:
    sizes: Tensor | None = None
    pos: Tensor | None = None
    keys: Tensor | None = None
    cls_inputs: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # layer -> (h, bias)


@dataclass
class ImageMeta:
    """Geometry of one image's projected features, keyed by the feature tensor's identity."""

    n_content: int
    content_pos: Tensor  # [T] position of each content token in the packed feature tensor
    segment: Tensor
    row: Tensor
    col: Tensor
    grid: tuple[int, int]
    crop_grid: tuple[int, int] | None
    sizes: Tensor
    vision_features: Tensor  # [T, Dv]
    cls_attn: dict[int, Tensor]
    cls_logits: dict[int, Tensor]
    keys: dict[int, Tensor]
    packed_row: Tensor | None = None  # [T] row of the hi-res grid (AnyRes crops), -1 for base tokens
    newline: Tensor | None = None  # [D] the newline embedding (AnyRes)
    run_offset: Tensor | None = None  # [T] each token's offset in the image's unshortened placeholder run
    run_len: int = 0  # length of that run
    newline_offset: Tensor | None = None  # [lines] offset of each hi-res row's newline in that run (AnyRes)


@dataclass
class Stats:
    """What the last forward pass did: visual tokens per sample entering each LLM layer, and per image."""

    image_tokens_in: list[int] = field(default_factory=list)  # per image, before any visual plugin
    image_tokens_out: list[int] = field(default_factory=list)  # per image, entering the LLM
    llm_visual_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> per sample


class _Undo:
    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def hook(self, handle: Any) -> None:
        self._actions.append(handle.remove)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        old = obj.__dict__.get(name)
        setattr(obj, name, value)

        def undo() -> None:
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        self._actions.append(undo)

    def run(self) -> None:
        while self._actions:
            self._actions.pop()()


# ---------------------------------------------------------------------------------------------------


class LlavaAdapter:
    """Stage hooks for ``LlavaForConditionalGeneration`` (one image = one grid of patch tokens)."""

    model_classes: tuple[str, ...] = ("LlavaForConditionalGeneration",)
    anyres = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base = model.model
        self.lm = self.base.language_model
        self.layers = self.lm.layers
        self.vit = self.base.vision_tower
        self.vit_layers = self.vit.encoder.layers
        self.config = model.config
        self.image_token_id = int(self.config.image_token_id)
        vc = self.config.vision_config
        self.patch_grid = (vc.image_size // vc.patch_size, vc.image_size // vc.patch_size)
        self.plugins: list[Plugin] = []
        self.stats = Stats()
        self._undo = _Undo()
        self._run: RunState = RunState(mode="off")
        self._plans: dict[int, tuple[weakref.ref, SeqPlan]] = {}
        self._meta: dict[int, ImageMeta] = {}
        self._vstate = VisionState()
        self._request = VisualRequest()
        self._memo: Memo | None = None
        self._memo_scope = 0  # > 0 inside a generate() call (see Memo)

    # -- properties of the model ----------------------------------------------------------------
    @property
    def n_llm_layers(self) -> int:
        return len(self.layers)

    def feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise MmtokenError("mmtoken supports a single vision_feature_layer (an int)")
        return layer

    def vit_used_layers(self) -> int:
        """ViT layers whose output reaches the projector (all layers up to the feature layer)."""
        n = len(self.vit_layers)
        fl = self.feature_layer()
        return fl + 1 + n if fl < 0 else fl

    def _vit_index(self, layer: int) -> int:
        n = len(self.vit_layers)
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise MmtokenError(f"ViT layer {layer} out of range for a {n}-layer vision tower")
        return idx

    def has_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    # -- install / remove -----------------------------------------------------------------------
    def install(self, plugins: list[Plugin]) -> None:
        for p in plugins:
            p.bind(self.model)
        self.plugins = plugins
        by_stage = {s: [p for p in plugins if s in p.stages] for s in ("vision", "visual", "llm", "attention", "decode")}
        self._visual = by_stage["visual"]
        self._llm = by_stage["llm"]
        modes = {(p.name, p.config.positions) for p in by_stage["vision"] + self._visual if hasattr(p.config, "positions")}
        if len({m for _, m in modes}) > 1:
            raise CompositionError(
                "plugins disagree on positions= (" + ", ".join(f"{n}: {m}" for n, m in sorted(modes)) + "); give all the same"
            )
        self._positions = next(iter(modes))[1] if modes else "compact"
        self._attn = by_stage["attention"]
        req = VisualRequest()
        for p in self._visual:
            req = req.merge(p.visual_request())
        self._request = req
        for layer in req.layers():
            self._vit_index(layer)
        if (self._visual or by_stage["vision"]) and not self.has_cls():
            needs_cls = bool(req.cls_attn or req.cls_logits) or bool(by_stage["vision"])
            if needs_cls:
                raise CompositionError(
                    "this vision tower's features carry no CLS token (vision_feature_select_strategy='full'); "
                    "CLS-attention plugins need the 'default' strategy"
                )
        self._install_vision(by_stage["vision"])
        if by_stage["vision"]:
            self._undo.set_attr(self.model, "_expand_multimodal_outputs", self._wrap_expand(self.model._expand_multimodal_outputs))
        self._undo.set_attr(self.base, "get_image_features", self._wrap_get_image_features(self.base.get_image_features))
        self._undo.set_attr(self.base, "forward", self._wrap_forward(self.base.forward))
        self._install_llm()
        gen = self._scope_memo(self.model.generate)
        for p in by_stage["decode"]:
            gen = p.wrap_generate(gen, self.model)
        self._undo.set_attr(self.model, "generate", gen)

    def _scope_memo(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        """``generate`` with the memo (see :class:`Memo`) limited to the call."""
        adapter = self

        @functools.wraps(generate)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            outer, adapter._memo = adapter._memo, None  # a nested call leaves the outer call's memo alone
            adapter._memo_scope += 1
            try:
                return generate(*args, **kwargs)
            finally:
                adapter._memo_scope -= 1
                adapter._memo = outer if adapter._memo_scope > 0 else None

        return scoped

    def remove(self) -> None:
        self._undo.run()
        self._plans.clear()
        self._meta.clear()
        self._memo = None
        self._run = RunState(mode="off")

    # -- vision stage ---------------------------------------------------------------------------
    def _install_vision(self, plugins: list[Plugin]) -> None:
        n_used = self.vit_used_layers()
        vc = self.config.vision_config
        n_tokens = self.patch_grid[0] * self.patch_grid[1] + 1
        per_layer: dict[int, list[Plugin]] = {}
        for p in plugins:
            for layer in p.vision_layers(n_used, n_tokens):
                if not 0 <= layer < n_used:
                    raise CompositionError(f"{p.name}: ViT layer {layer} is not used by this model (0..{n_used - 1})")
                per_layer.setdefault(layer, []).append(p)
        if not per_layer:
            return
        merge_layers = sorted(per_layer)
        last_merge = merge_layers[-1]
        for layer in self._request.layers():
            if self._vit_index(layer) <= last_merge:
                raise CompositionError(
                    f"a visual plugin reads ViT layer {layer}, but a vision plugin merges tokens up to layer "
                    f"{last_merge}; its attention would not line up with the merged features"
                )
        adapter = self

        def reset(_module: Any, _args: Any) -> None:
            adapter._vstate = VisionState()

        self._undo.hook(self.vit.register_forward_pre_hook(reset))
        first = min(merge_layers)
        heads = vc.num_attention_heads
        for i, layer in enumerate(self.vit_layers[:n_used]):
            if i < first:
                continue
            here = per_layer.get(i, [])
            self._undo.set_attr(layer, "forward", types.MethodType(_make_vit_layer_forward(adapter, i, n_used, here, heads), layer))

    def _wrap_expand(self, orig: Callable) -> Callable:
        """``generate()`` expands image features for beams / several return sequences by matching their
        counts to the placeholders, which a vision-stage merge has changed; group them by each sample's
        placeholder runs instead (one run per image)."""
        adapter = self

        @functools.wraps(orig)
        def expand(input_ids: Tensor, mm_encoder_output: dict, expand_size: int = 1, inputs_embeds: Tensor | None = None) -> dict:
            out = mm_encoder_output.get("image")
            if out is None or input_ids is None or expand_size == 1:
                return orig(input_ids, mm_encoder_output, expand_size=expand_size, inputs_embeds=inputs_embeds)
            feats = list(out.pooler_output)
            counts = [len(placeholder_runs(row, adapter.image_token_id)) for row in input_ids]
            if sum(counts) != len(feats):
                raise MmtokenError(f"found {sum(counts)} runs of image tokens for {len(feats)} images")
            groups, start = [], 0
            for c in counts:
                groups.append(feats[start : start + c])
                start += c
            out.pooler_output = [f for g in groups for _ in range(expand_size) for f in g]
            return mm_encoder_output

        return expand

    # -- visual stage: capture ------------------------------------------------------------------
    def _wrap_get_image_features(self, orig: Callable) -> Callable:
        adapter = self

        @functools.wraps(orig)
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            captures: dict[int, dict[str, Tensor]] = {}
            handles = []
            req = adapter._request
            for layer in req.layers():
                i = adapter._vit_index(layer)
                attn = adapter.vit_layers[i].self_attn

                def pre(mod: Any, a: Any, kw: Any, _i: int = i) -> None:
                    h = a[0] if a else kw["hidden_states"]
                    captures[_i] = {"h": h, "bias": kw.get("attention_mask")}

                handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            proj_in: list[Tensor] = []
            handles.append(adapter.base.multi_modal_projector.register_forward_pre_hook(lambda m, a: proj_in.append(a[0])))
            try:
                out = orig(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            sig = inspect.signature(orig).bind_partial(*args, **kwargs).arguments
            adapter._record_meta(out, proj_in[-1] if proj_in else None, captures, sig.get("image_sizes"))
            return out

        return get_image_features

    def _cls_tables(self, captures: dict[int, dict[str, Tensor]]) -> tuple[dict, dict, dict]:
        """Per requested layer, ``[N_views, T]`` CLS attention / logits and ``[N_views, T, D]`` keys
        (CLS column dropped)."""
        attn_t, logit_t, key_t = {}, {}, {}
        req = self._request
        for layer in req.layers():
            i = self._vit_index(layer)
            cap = captures[i]
            attn_mod = self.vit_layers[i].self_attn
            with torch.no_grad():
                if layer in req.cls_attn or layer in req.cls_logits:
                    probs, logits = vit_cls_attention(attn_mod, cap["h"], cap["bias"])
                    attn_t[layer] = probs.mean(1)[:, 1:]
                    logit_t[layer] = logits.mean(1)[:, 1:]
                if layer in req.keys:
                    key_t[layer] = attn_mod.k_proj(cap["h"])[:, 1:]
        return attn_t, logit_t, key_t

    def _record_meta(self, out: Any, proj_in: Tensor | None, captures: dict, image_sizes: Any) -> None:
        self._meta.clear()
        feats = list(out.pooler_output)
        attn_t, logit_t, key_t = self._cls_tables(captures)
        vs = self._vstate
        h, w = self.patch_grid
        for i, f in enumerate(feats):
            t = f.shape[0]
            if vs.pos is not None:
                pos = vs.pos[i, 1:] if self.has_cls() else vs.pos[i]
                sizes = vs.sizes[i, 1:] if self.has_cls() else vs.sizes[i]
                run_len = h * w
            else:
                pos = torch.arange(t, device=f.device)
                sizes = torch.ones(t, device=f.device)
                run_len = t
            self._meta[id(f)] = ImageMeta(
                n_content=t,
                content_pos=torch.arange(t, device=f.device),
                segment=torch.zeros(t, dtype=torch.long, device=f.device),
                row=pos // w,
                col=pos % w,
                grid=(h, w),
                crop_grid=None,
                sizes=sizes.float(),
                vision_features=proj_in[i] if proj_in is not None else f,
                cls_attn={k: v[i] for k, v in attn_t.items()},
                cls_logits={k: v[i] for k, v in logit_t.items()},
                keys={k: v[i] for k, v in key_t.items()},
                run_offset=pos.long(),
                run_len=run_len,
            )

    def _tokens_of(self, feat: Tensor) -> tuple[VisualTokens, ImageMeta]:
        meta = self._meta.get(id(feat))
        if meta is None:
            raise MmtokenError(
                "visual-stage plugins need the image features computed by this model's get_image_features "
                "(pass pixel_values, not precomputed mm_encoder_outputs)"
            )
        cp = meta.content_pos
        tokens = VisualTokens(
            features=feat[cp],
            vision_features=meta.vision_features,
            segment=meta.segment,
            row=meta.row,
            col=meta.col,
            grid=meta.grid,
            crop_grid=meta.crop_grid,
            sizes=meta.sizes,
            cls_attn=meta.cls_attn,
            cls_logits=meta.cls_logits,
            keys=meta.keys,
            project=self.base.multi_modal_projector,
            vit_heads=self.config.vision_config.num_attention_heads,
        )
        return tokens, meta

    def _select(self, feat: Tensor) -> Tensor:
        """Run the visual plugins on one image's features; returns the features the LLM receives."""
        tokens, meta = self._tokens_of(feat)
        alive = torch.arange(len(tokens), device=feat.device)
        extras: list[Tensor] = []
        for p in self._visual:
            sel: Selection = p.select(tokens)
            keep = sel.keep.to(feat.device).long()
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= len(tokens)):
                raise MmtokenError(f"{p.name}: selected index out of range")
            keep, order = torch.sort(keep)
            alive = alive[keep]
            tokens = tokens.subset(keep)
            if sel.replace is not None:
                tokens.features = sel.replace[order].to(feat.dtype)
            if sel.extra is not None:
                extras.append(sel.extra.to(feat.dtype))
            if sel.extra_vision is not None:
                with torch.no_grad():
                    extras.append(self.base.multi_modal_projector(sel.extra_vision.unsqueeze(0))[0].to(feat.dtype))
        out, offsets = self._assemble(tokens.features, meta, alive, extras)
        self._offsets[id(out)] = offsets
        return out

    def _assemble(self, kept: Tensor, meta: ImageMeta, alive: Tensor, extras: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The features the LLM receives for one image and each one's offset in the unshortened run."""
        return torch.cat([kept] + extras, dim=0), _with_extras(meta.run_offset[alive], meta.run_len, extras)

    # -- the base model's forward: sequence rewriting, decode translation -----------------------
    def _wrap_forward(self, orig: Callable) -> Callable:
        adapter = self
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            a = dict(bound.arguments)
            extra = a.pop("kwargs", {})
            a.update(extra)
            return adapter._forward(orig, a)

        return forward

    def _forward(self, orig: Callable, a: dict[str, Any]) -> Any:
        cache = a.get("cache")
        if cache is not None and cache.get_seq_length() > 0:
            return self._decode_forward(orig, a, cache)
        ids = a.get("input_ids")
        pixel_values = a.get("pixel_values")
        mm = a.get("mm_encoder_outputs") or {}
        if pixel_values is not None and (not hasattr(pixel_values, "numel") or pixel_values.numel() > 0):
            kw = {"pixel_values": pixel_values}
            for name in ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy"):
                if a.get(name) is not None:
                    kw[name] = a[name]
            kw["return_dict"] = True
            mm = dict(mm)
            mm["image"] = self.base.get_image_features(**kw)
            a["pixel_values"] = None
            a["mm_encoder_outputs"] = mm
        image_out = mm.get("image")
        feats = list(image_out.pooler_output) if image_out is not None else []
        self.stats = Stats(image_tokens_in=[int(f.shape[0]) for f in feats])
        self._offsets = {}
        shorten = self._visual or (self._positions == "original" and feats)
        new_feats = [self._select(f) for f in feats] if shorten else feats
        self.stats.image_tokens_out = [int(f.shape[0]) for f in new_feats]
        attention_mask = a.get("attention_mask")
        plan = None
        if feats:
            if ids is not None:
                plan = self._rewrite(a, ids, attention_mask, feats, new_feats)
            elif any(n.shape[0] != f.shape[0] for n, f in zip(new_feats, feats)) or self._llm:
                raise MmtokenError("mmtoken needs input_ids (not inputs_embeds) to locate image tokens")
            image_out.pooler_output = new_feats
        ids = a.get("input_ids")
        if ids is not None:
            image_mask = ids == self.image_token_id
        else:
            image_mask = torch.zeros(a["inputs_embeds"].shape[:2], dtype=torch.bool, device=a["inputs_embeds"].device)
        am = a.get("attention_mask")
        valid = am.bool() if am is not None and am.dim() == 2 else torch.ones_like(image_mask)
        if plan is None:
            plan = SeqPlan(orig_len=image_mask.shape[1], new_mask=valid.long(), shift=torch.zeros(image_mask.shape[0], dtype=torch.long, device=image_mask.device))
        plan.image_mask = image_mask
        self._run = RunState(mode="prefill", image_mask=image_mask, valid=valid, plan=plan)
        new_ids = a.get("input_ids")
        use_memo = self._memo_scope > 0 and a.get("use_cache") is False and cache is None
        memo = self._memo if use_memo else None
        if (
            memo is not None and new_ids is not None and new_ids.shape[0] == memo.ids.shape[0]
            and new_ids.shape[1] > memo.ids.shape[1] and torch.equal(new_ids[:, : memo.ids.shape[1]], memo.ids)
        ):
            self._run.memo = memo
        try:
            out = orig(**a)
        finally:
            run, self._run = self._run, RunState(mode="off")
            if image_out is not None:
                image_out.pooler_output = feats
        self.stats.llm_visual_tokens = _host_counts(run.counts)
        if use_memo and new_ids is not None and run.kept and run.memo is None:
            self._memo = Memo(ids=new_ids, kept=run.kept)
        out_cache = getattr(out, "cache", None)
        if out_cache is not None:
            self._remember(out_cache, plan)
        return out

    def _rewrite(self, a: dict, ids: Tensor, attention_mask: Tensor | None, feats: list[Tensor], new_feats: list[Tensor]) -> SeqPlan | None:
        """Give each image as many placeholders as it now has tokens, per sample, keeping the padding side."""
        b, l = ids.shape
        am = attention_mask if attention_mask is not None else torch.ones_like(ids)
        runs = [placeholder_runs(ids[i], self.image_token_id) for i in range(b)]
        n_runs = sum(len(r) for r in runs)
        if n_runs != len(feats):
            raise MmtokenError(
                f"found {n_runs} runs of image tokens (config.image_token_id={self.image_token_id}) for "
                f"{len(feats)} images; each image needs its own contiguous run of placeholders"
            )
        lengths = [length for r in runs for (_, length) in r]
        original = self._positions == "original"
        if self._unchanged(new_feats, lengths, original):
            return None
        right_padded = bool((am[:, -1] == 0).any()) and bool((am[:, 0] == 1).all())
        if original:  # the ids the full sequence gets: the caller's (generate() passes them), else the model's default
            given = a.get("position_ids")
            if given is not None and given.dim() == 2 and given.shape[0] == 1:
                given = given.expand(b, -1)  # broadcast over the batch, as the model does
            if given is not None and tuple(given.shape) != (b, l):
                raise MmtokenError(f"positions=original needs position ids of shape [batch, length] = [{b}, {l}], got {tuple(given.shape)}")
            opos = given if given is not None else torch.arange(l, device=ids.device).expand(b, l)
        rows, prow, k = [], [], 0
        for i in range(b):
            row_ids: list[Tensor] = []
            row_pos: list[Tensor] = []
            cursor = 0
            for start, length in runs[i]:
                real = am[i, cursor:start].bool()
                row_ids.append(ids[i, cursor:start][real])
                row_ids.append(torch.full((new_feats[k].shape[0],), self.image_token_id, dtype=ids.dtype, device=ids.device))
                if original:
                    row_pos.append(opos[i, cursor:start][real])
                    row_pos.append(opos[i, start + self._offsets[id(new_feats[k])].to(opos.device)])
                cursor = start + length
                k += 1
            row_ids.append(ids[i, cursor:][am[i, cursor:].bool()])
            rows.append(torch.cat(row_ids))
            if original:
                row_pos.append(opos[i, cursor:][am[i, cursor:].bool()])
                prow.append(torch.cat(row_pos))
        lmax = max(int(r.numel()) for r in rows)
        pad_id = self.config.text_config.pad_token_id
        pad_id = int(pad_id) if pad_id is not None else 0
        new_ids = torch.full((b, lmax), pad_id, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros((b, lmax), dtype=am.dtype, device=am.device)
        new_pos = torch.zeros((b, lmax), dtype=torch.long, device=ids.device) if original else None
        for i, r in enumerate(rows):
            n = r.numel()
            sl = slice(0, n) if right_padded else slice(lmax - n, lmax)
            new_ids[i, sl] = r
            new_mask[i, sl] = 1
            if original:
                new_pos[i, sl] = prow[i]
        a["input_ids"] = new_ids
        if attention_mask is not None or not bool((new_mask == 1).all()):
            a["attention_mask"] = new_mask
        shift = am.long().sum(-1) - new_mask.long().sum(-1)
        if original:
            # explicit ids: the model's default would number the shortened sequence afresh; and an explicit
            # mask: without one, transformers reads every gap in the ids as the start of a packed sequence
            a["position_ids"] = new_pos
            a["attention_mask"] = new_mask
            return SeqPlan(orig_len=l, new_mask=new_mask, shift=shift, original_ids=True)
        if a.get("position_ids") is not None:
            pos = new_mask.long().cumsum(-1) - 1
            a["position_ids"] = pos.masked_fill(new_mask == 0, 0)
        return SeqPlan(orig_len=l, new_mask=new_mask, shift=shift)

    def _unchanged(self, new_feats: list[Tensor], lengths: list[int], original: bool) -> bool:
        """Whether every image kept its placeholder count; with original position ids, also every token
        where it was (a plugin may reorder tokens without dropping any)."""
        if any(n.shape[0] != length for n, length in zip(new_feats, lengths)):
            return False
        if not original:
            return True
        for n in new_feats:
            offsets = self._offsets[id(n)]
            if not torch.equal(offsets, torch.arange(n.shape[0], device=offsets.device)):
                return False
        return True

    def _remember(self, cache: Any, plan: SeqPlan) -> None:
        for key in [k for k, (ref, _) in self._plans.items() if ref() is None]:
            del self._plans[key]
        try:
            ref = weakref.ref(cache)
        except TypeError:
            ref = lambda c=cache: c  # noqa: E731
        self._plans[id(cache)] = (ref, plan)

    def _decode_forward(self, orig: Callable, a: dict[str, Any], cache: Any) -> Any:
        entry = self._plans.get(id(cache))
        plan = entry[1] if entry is not None and entry[0]() is cache else None
        if plan is None:
            return orig(**a)
        am = a.get("attention_mask")
        if am is not None and am.dim() == 2 and am.shape[1] >= plan.orig_len:
            am = torch.cat([plan.new_mask.to(am.dtype), am[:, plan.orig_len :]], dim=1)
            a["attention_mask"] = am
        pos = a.get("position_ids")
        if pos is not None and not plan.original_ids:
            a["position_ids"] = pos - plan.shift.to(pos.device).view(-1, *([1] * (pos.dim() - 1)))
        ids = a.get("input_ids")
        ref = ids if ids is not None else a["inputs_embeds"][..., 0]
        b, q = ref.shape[0], ref.shape[1]
        if pos is None and plan.original_ids:
            # the model would count from the shortened cache; count from the full one (its default numbering)
            past = cache.get_seq_length() - plan.new_mask.shape[1] + plan.orig_len
            a["position_ids"] = (past + torch.arange(q, device=ref.device)).expand(b, q)
        step = am if am is not None and am.dim() == 2 else torch.ones(b, cache.get_seq_length() + q, dtype=torch.long, device=ref.device)
        self._run = RunState(mode="decode", plan=plan, step_mask2d=step.bool())
        try:
            return orig(**a)
        finally:
            self._run = RunState(mode="off")

    # -- llm / attention stages -----------------------------------------------------------------
    def _install_llm(self) -> None:
        n = self.n_llm_layers
        self._drops: dict[int, list[tuple[Plugin, LLMDrop]]] = {}
        self._row_requests: dict[int, str] = {}
        for p in self._llm:
            for d in p.llm_plan(n):
                if not 0 <= d.layer < n:
                    raise CompositionError(f"{p.name}: LLM layer {d.layer} out of range (0..{n - 1})")
                if d.layer in self._drops and d.rows_from is not None:
                    first = self._drops[d.layer][0][0].name
                    raise CompositionError(
                        f"{p.name} ranks tokens by attention rows at LLM layer {d.layer}, where {first} already drops "
                        "tokens; put it first in the spec"
                    )
                self._drops.setdefault(d.layer, []).append((p, d))
                if d.rows_from is not None:
                    if not 0 <= d.rows_from < d.layer:
                        raise CompositionError(f"{p.name}: attention rows must come from a layer before {d.layer}")
                    if self._row_requests.get(d.rows_from, d.queries) != d.queries:
                        raise CompositionError(f"{p.name}: layer {d.rows_from}'s attention rows are already asked for with other queries")
                    self._row_requests[d.rows_from] = d.queries
        self._bias_layers: dict[int, list[Plugin]] = {}
        for p in sorted(self._attn, key=lambda p: not p.shapes_attention):  # stable: spec order otherwise
            for layer in p.attention_layers(n):
                self._bias_layers.setdefault(layer, []).append(p)
        for i, layer in enumerate(self.layers):
            self._undo.hook(layer.register_forward_pre_hook(functools.partial(self._layer_pre, i), with_kwargs=True))
        for i, queries in self._row_requests.items():
            hook = functools.partial(self._rows_pre, i, queries)
            self._undo.hook(self.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))

    def _current(self, x: Tensor | None, run: RunState) -> Tensor | None:
        return x if run.idx is None or x is None else x.gather(1, run.idx)

    def _current_valid(self, run: RunState) -> Tensor:
        """Real (not padding, not dummy) positions of the layer's current sequence."""
        valid = self._current(run.valid, run)
        return valid if run.dummy is None else valid & ~run.dummy

    def _layer_pre(self, i: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = self._run
        if run.mode == "off":
            return None
        if run.mode == "decode":
            return self._decode_layer(i, args, kwargs, run)
        hidden = args[0] if args else kwargs["hidden_states"]
        if i in self._drops:
            if run.memo is not None and i in run.memo.kept:
                hidden = self._apply_keep(run, hidden, self._recall(run, i, self._current_valid(run)))
            else:
                for plugin, drop in self._drops[i]:  # several plugins at one layer: in spec order
                    valid = self._current_valid(run)
                    rows = run.rows.get(drop.rows_from) if drop.rows_from is not None else None
                    ctx = LLMContext(
                        layer=i,
                        n_layers=self.n_llm_layers,
                        hidden=hidden,
                        image_mask=self._current(run.image_mask, run) & valid,
                        valid=valid,
                        last=_last_valid(valid),
                        attn=rows[0] if rows else None,
                        attn_queries=rows[1] if rows else None,
                    )
                    hidden = self._apply_keep(run, hidden, plugin.llm_keep(ctx))
            kept = torch.zeros_like(run.valid)
            kept.scatter_(1, run.idx, ~run.dummy)
            run.kept[i] = kept
        if run.idx is not None:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (gather_seq(cos, run.idx), gather_seq(sin, run.idx))
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = gather_seq(kwargs["position_ids"], run.idx)
            mask = kwargs.get("attention_mask")
            if mask is not None or run.any_dummy:
                kwargs["attention_mask"] = self._prefill_mask(run, hidden.dtype)
            run.plan.layers[i] = LayerPlan(run.idx, run.dummy, run.any_dummy)
        if i in self._bias_layers:
            kwargs["attention_mask"] = self._add_bias(i, kwargs.get("attention_mask"), hidden, run, kwargs)
        if not run.counts or i in self._drops:
            vis = self._current(run.image_mask, run)
            if run.dummy is not None:
                vis = vis & ~run.dummy
            run.counts[i] = vis.sum(-1)
        else:
            run.counts[i] = None
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _apply_keep(self, run: RunState, hidden: Tensor, keep: list[Tensor]) -> Tensor:
        """Gather the kept positions (current coordinates, per sample) and update the run's index map."""
        keep = [torch.sort(k.to(hidden.device).long())[0] for k in keep]
        rel, dummy = pad_index_lists(keep, side="left")
        hidden = gather_seq(hidden, rel)
        base_idx = run.idx
        if base_idx is None:
            base_idx = torch.arange(run.image_mask.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        run.idx = base_idx.gather(1, rel)
        run.dummy = dummy if run.dummy is None else (run.dummy.gather(1, rel) | dummy)
        run.any_dummy = bool(run.dummy.any())
        return hidden

    def _recall(self, run: RunState, i: int, valid_cur: Tensor) -> list[Tensor]:
        """Positions (current coordinates) kept at drop layer ``i``: the memo's decision on the prompt, and
        every token after it."""
        old = run.memo.kept[i]
        absolute = run.valid.clone()
        absolute[:, : old.shape[1]] = old & run.valid[:, : old.shape[1]]
        cur = self._current(absolute, run) & valid_cur
        return [row.nonzero().flatten() for row in cur]

    def _prefill_mask(self, run: RunState, dtype: torch.dtype) -> Tensor:
        if run.mask_cache is not None and run.mask_cache[0] is run.idx and run.mask_cache[1] == dtype:
            return run.mask_cache[2]
        key_ok = run.valid.gather(1, run.idx) & ~run.dummy
        n = run.idx.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=key_ok.device).tril()
        allowed = causal[None] & key_ok[:, None, :]
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=key_ok.device)[None]
        mask = additive_mask(allowed[:, None], dtype)
        run.mask_cache = (run.idx, dtype, mask)
        return mask

    def _decode_layer(self, i: int, args: tuple, kwargs: dict, run: RunState) -> tuple[tuple, dict] | None:
        lp = run.plan.layers.get(i)
        changed = False
        hidden = args[0] if args else kwargs["hidden_states"]
        if lp is not None and lp.idx is not None:
            mask = kwargs.get("attention_mask")
            if run.mask_cache is not None and run.mask_cache[0] is lp.idx and run.mask_cache[1] == hidden.dtype:
                kwargs["attention_mask"] = run.mask_cache[2]
                changed = True
            elif mask is not None or lp.any_dummy:
                step = run.step_mask2d
                l0 = run.plan.new_mask.shape[1]
                prefix = run.plan.new_mask.bool().gather(1, lp.idx) & ~lp.dummy
                tail = step[:, l0:]
                q = hidden.shape[1]
                keys = torch.cat([prefix, tail], dim=1)
                allowed = keys[:, None, :].expand(-1, q, -1).clone()
                t = tail.shape[1]
                if q > 1:
                    causal = torch.ones(q, t, dtype=torch.bool, device=keys.device).tril(diagonal=t - q)
                    allowed[:, :, prefix.shape[1] :] &= causal[None]
                kwargs["attention_mask"] = additive_mask(allowed[:, None], hidden.dtype)
                run.mask_cache = (lp.idx, hidden.dtype, kwargs["attention_mask"])
                changed = True
        if i in self._bias_layers:
            mask = kwargs.get("attention_mask")
            new = self._add_bias(i, mask, hidden, run, kwargs)
            if new is not mask:
                kwargs["attention_mask"] = new
                changed = True
        return (args, kwargs) if changed else None

    def _add_bias(self, i: int, mask: Tensor | None, hidden: Tensor, run: RunState, kwargs: dict) -> Tensor | None:
        """The layer's mask plus the attention plugins' biases; the mask itself when no plugin adds one."""
        b, q = hidden.shape[:2]
        if mask is not None:
            kv = mask.shape[-1]
        elif run.mode == "prefill":
            kv = q
        else:
            kv = run.step_mask2d.shape[1]
            lp = run.plan.layers.get(i)
            if lp is not None and lp.idx is not None:
                kv = kv - run.plan.new_mask.shape[1] + lp.idx.shape[1]
        ctx: dict[str, Any] = {"run": run, "hidden": hidden, "module": self.layers[i], "kwargs": kwargs, "mask": mask}
        if run.mode == "prefill":
            valid = self._current_valid(run)
            ctx["valid"], ctx["image_mask"] = valid, self._current(run.image_mask, run) & valid
        else:
            lp = run.plan.layers.get(i)
            image0 = run.plan.image_mask
            if lp is not None and lp.idx is not None:  # the layer caches only the prefill positions kept there
                image0 = image0.gather(1, lp.idx)
                if lp.dummy is not None:
                    image0 = image0 & ~lp.dummy
            ctx["prefill_image_mask"] = image0
        out = mask
        for p in self._bias_layers[i]:  # plugins that shape the attention come first (see _install_llm)
            bias = p.attention_bias(i, q, kv, ctx)
            if bias is None:
                continue
            if out is None:
                allowed = torch.ones(b, 1, q, kv, dtype=torch.bool, device=hidden.device).tril(diagonal=kv - q)
                out = additive_mask(allowed, hidden.dtype)
            elif out.dtype == torch.bool:
                out = additive_mask(out, hidden.dtype)
            out = out + bias.to(out.dtype)
            if p.shapes_attention:  # later plugins see which keys each query may attend to
                ctx["mask"] = out
        return out

    def _rows_pre(self, i: int, queries: str, module: Any, args: tuple, kwargs: dict) -> None:
        run = self._run
        if run.mode != "prefill":
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        valid = self._current_valid(run)
        if queries == "last":
            rows = _last_valid(valid)[:, None]
        else:
            img = self._current(run.image_mask, run)
            first_img = torch.where(img.any(-1), img.float().argmax(-1), torch.zeros_like(img[:, 0], dtype=torch.long))
            pos = torch.arange(valid.shape[1], device=valid.device)[None]
            text = valid & ~img & (pos > first_img[:, None])
            lists = [t.nonzero().flatten() if bool(t.any()) else _last_valid(valid)[b : b + 1] for b, t in enumerate(text)]
            rows, _ = pad_index_lists(lists, side="right")
        with torch.no_grad():
            probs = llm_attention_rows(module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), rows)
        run.rows[i] = (probs.mean(1), rows)
        return None


def _with_extras(offsets: Tensor, run_len: int, extras: list[Tensor]) -> Tensor:
    """``offsets`` followed by those of the ``extras`` (tokens a plugin adds after the kept ones, e.g.
    VisionZip's contextual tokens, which stand for removed tokens): the highest offsets of the run that no
    kept token holds, in order. If fewer are free (no built-in plugin adds more tokens than it removes),
    the rest take the run's last offsets, shared with kept tokens."""
    n_extra = sum(int(e.shape[0]) for e in extras)
    if not n_extra:
        return offsets
    free = torch.ones(run_len, dtype=torch.bool, device=offsets.device)
    free[offsets[(offsets >= 0) & (offsets < run_len)]] = False
    tail = free.nonzero().flatten()[-n_extra:]
    if tail.numel() < n_extra:
        tail = torch.cat([tail, torch.arange(run_len - n_extra + tail.numel(), run_len, device=offsets.device).clamp_min(0)])
    return torch.cat([offsets, tail])


def _host_counts(counts: dict[int, Tensor | None]) -> dict[int, list[int]]:
    """Per-layer visual-token counts as lists, read from the device in one transfer."""
    changed = [layer for layer in counts if counts[layer] is not None]
    if not changed:
        return {}
    values = dict(zip(changed, torch.stack([counts[layer] for layer in changed]).tolist()))
    out, cur = {}, None
    for layer in counts:  # insertion order = the order the layers ran
        cur = values.get(layer, cur)
        out[layer] = list(cur)
    return out


def _last_valid(valid: Tensor) -> Tensor:
    pos = torch.arange(valid.shape[1], device=valid.device)[None].expand_as(valid)
    return torch.where(valid, pos, torch.full_like(pos, -1)).max(-1).values.clamp(min=0)


def _make_vit_layer_forward(adapter: LlavaAdapter, index: int, n_used: int, plugins: list[Plugin], heads: int) -> Callable:
    """The forward of one CLIP encoder layer with proportional attention and the plugins' merges between
    attention and MLP (ToMe's placement)."""
    wants_cls = any(p.vision_wants_cls_attn() for p in plugins)

    def forward(self: torch.nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        st = adapter._vstate
        b, t, _ = hidden_states.shape
        if st.sizes is None or st.sizes.shape != (b, t):
            st.sizes = torch.ones(b, t, device=hidden_states.device, dtype=torch.float32)
            st.pos = torch.arange(t, device=hidden_states.device)[None].expand(b, t) - (1 if adapter.has_cls() else 0)
        bias = attention_mask
        if bool((st.sizes != 1).any()):
            prop = st.sizes.log().to(hidden_states.dtype)[:, None, None, :]
            bias = prop if bias is None else bias + prop
        residual = hidden_states
        h = self.layer_norm1(hidden_states)
        attn_out, _ = self.self_attn(hidden_states=h, attention_mask=bias, **kwargs)
        x = residual + attn_out
        if plugins:
            keys = self.self_attn.k_proj(h)
            cls_attn = None
            if wants_cls:
                with torch.no_grad():
                    cls_attn = vit_cls_attention(self.self_attn, h, bias[:, 0, 0] if bias is not None else None)[0].mean(1)
            for p in plugins:
                ctx = VisionContext(
                    layer=index, n_layers=n_used, x=x, keys=keys, sizes=st.sizes, pos=st.pos,
                    num_heads=heads, has_cls=adapter.has_cls(), cls_attn=cls_attn,
                )
                p.vision_merge(ctx)
                x, st.sizes, st.pos = ctx.x, ctx.sizes, ctx.pos
                keys, cls_attn = None, None
        x = x + self.mlp(self.layer_norm2(x))
        return x

    return forward
