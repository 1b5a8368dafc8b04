"""``dyvte``: dynamic visual-token exit (DyVTE, arXiv 2411.19628), `llm` stage.

Before decoder layer ``l`` (``l >= min_layer``) a small per-layer router reads the text tokens' hidden
states (the input of layer ``l``, i.e. the output of layer ``l - 1``) and decides whether the visual tokens
are still needed; at the first layer whose router says *exit*, every visual token leaves the sequence for
all remaining layers, so their keys and values are never computed there. Each sample of a batch exits at
its own layer (the adapter pads the shortened rows with masked slots, so batching and the KV cache keep
working); the remaining tokens keep their original position ids, as in the official code.

Router (the paper's): ``concat(mean of the text tokens' hidden states, the last token's) -> Linear(2d, h,
no bias) -> GELU -> Linear(h, 2, no bias)``; exit when ``logit[1] > logit[0] + margin``. ``text="after"``
averages the text tokens after the last image token except the last token (the paper); ``text="all"``
averages every text token except the last — for prompts whose question precedes the image, as in the
embedded world. Routers are trained with the model frozen (:func:`train_routers`,
``scripts/train_dyvte_routers.py``) and saved as ``dyvte_routers.safetensors`` beside the model, where the
plugin finds them (or ``routers=PATH``).

Modes: ``router`` (default, trained routers); ``attention`` — **a training-free heuristic of ours, not the
paper's method**: exit before layer ``l`` when the text tokens' mean attention mass on the visual tokens at
layer ``l - 1`` (side-computed, SDPA kept) falls below ``threshold``; ``fixed`` — every sample exits before
layer ``layer`` (for analysis and the exactness tests). Compose with FastV for the paper's DyVTE+FastV
variant: ``"fastv:k=2,keep=0.5+dyvte"`` (FastV prunes first at its layer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmtoken.config import PluginConfig, param
from mmtoken.errors import ConfigError, MmtokenError
from mmtoken.plugin import LLMContext, LLMDrop, Plugin, register_plugin

ROUTER_FILE = "dyvte_routers.safetensors"


class Routers(torch.nn.Module):
    """One router per decoder layer ``l`` (keys ``"l"``), each ``[2d] -> h -> [2]``."""

    def __init__(self, d: int, hidden: int, layers: list[int], text: str = "after"):
        super().__init__()
        self.d, self.hidden, self.text = d, hidden, text
        self.nets = torch.nn.ModuleDict({
            str(l): torch.nn.Sequential(torch.nn.Linear(2 * d, hidden, bias=False), torch.nn.GELU(), torch.nn.Linear(hidden, 2, bias=False))
            for l in layers
        })

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.nets)

    def forward(self, layer: int, features: Tensor) -> Tensor:
        net = self.nets[str(layer)]
        return net(features.to(net[0].weight.dtype))

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        meta = {"d": str(self.d), "hidden": str(self.hidden), "text": self.text, "layers": json.dumps(self.layers)}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "Routers":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        try:
            routers = cls(int(meta["d"]), int(meta["hidden"]), json.loads(meta["layers"]), meta.get("text", "after"))
        except (KeyError, ValueError) as exc:
            raise MmtokenError(f"{path}: not a dyvte router file (metadata field {exc} missing or bad)") from None
        routers.load_state_dict(load_file(path))
        return routers


def router_features(hidden: Tensor, image_mask: Tensor, valid: Tensor, last: Tensor, text: str = "after") -> Tensor:
    """``[B, 2d]``: the mean hidden state of the text tokens (``text="after"``: after the last image token;
    ``"all"``: anywhere), the last token excluded, concatenated with the last token's hidden state."""
    b, n, _ = hidden.shape
    pos = torch.arange(n, device=hidden.device)[None].expand(b, -1)
    sel = valid & ~image_mask & (pos != last[:, None])
    if text == "after":
        last_img = torch.where(image_mask, pos, torch.full_like(pos, -1)).max(-1).values
        sel = sel & (pos > last_img[:, None])
    w = sel.to(hidden.dtype)
    mean = (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    lastv = hidden.gather(1, last[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
    return torch.cat([mean, lastv], dim=-1)


def exit_keep(image_mask: Tensor, valid: Tensor, exit_now: Tensor) -> list[Tensor]:
    """Per sample: every valid position, minus the visual ones where ``exit_now`` ``[B]``."""
    drop = image_mask & exit_now[:, None]
    return [(valid[b] & ~drop[b]).nonzero().flatten() for b in range(valid.shape[0])]


@dataclass
class DyVTEConfig(PluginConfig):
    mode: str = param("router", choices=("router", "attention", "fixed"), doc="router (trained), attention (heuristic of ours), fixed")
    routers: str = param("", doc="router file (default: dyvte_routers.safetensors beside the model)")
    margin: float = param(0.0, doc="exit when logit[exit] > logit[stay] + margin (higher: later exits)")
    min_layer: int = param(1, lo=0, doc="first layer before which the visual tokens may exit")
    threshold: float = param(0.1, lo=0.0, hi=1.0, doc="attention mode: exit when text->visual attention mass < this")
    layer: int = param(2, lo=0, doc="fixed mode: the layer before which every sample exits")


@register_plugin
class DyVTEPlugin(Plugin):
    name = "dyvte"
    stages = ("llm",)
    Config = DyVTEConfig
    compresses = True

    def __init__(self, config: DyVTEConfig):
        super().__init__(config)
        self.router_net: Routers | None = None
        self.exit_layers: list[int] = []  # per sample of the last prefill: the exit layer, -1 = never
        self._first_layer: int | None = None  # the plan's first drop layer

    def bind(self, model: Any) -> None:
        if self.config.mode != "router":
            return
        path = self.config.routers or os.path.join(str(getattr(model.config, "_name_or_path", "") or ""), ROUTER_FILE)
        if not os.path.isfile(path):
            raise MmtokenError(
                f"dyvte: no trained routers at {path!r}; train them with scripts/train_dyvte_routers.py, pass "
                "routers=PATH, or use the heuristic mode dyvte:mode=attention"
            )
        net = Routers.load(path)
        d = model.config.text_config.hidden_size
        if net.d != d:
            raise MmtokenError(f"dyvte: routers in {path} are for hidden size {net.d}, the model has {d}")
        p = next(model.parameters())
        self.router_net = net.to(device=p.device, dtype=torch.float32).eval()

    def llm_plan(self, n_layers: int) -> list[LLMDrop]:
        c = self.config
        if c.mode == "fixed":
            if c.layer >= n_layers:
                raise ConfigError(f"dyvte: layer={c.layer} must be below the model's {n_layers} decoder layers")
            plan = [LLMDrop(layer=c.layer)]
        else:
            layers = range(max(c.min_layer, 1 if c.mode == "attention" else 0), n_layers)
            if c.mode == "router":
                trained = set(self.router_net.layers)
                plan = [LLMDrop(layer=l) for l in layers if l in trained]
            else:
                plan = [LLMDrop(layer=l, rows_from=l - 1, queries="text") for l in layers]
        self._first_layer = min((d.layer for d in plan), default=None)
        return plan

    def llm_keep(self, ctx: LLMContext) -> list[Tensor]:
        c = self.config
        if ctx.layer == self._first_layer:  # a new prefill: forget the last one's exits
            self.exit_layers = [-1] * ctx.hidden.shape[0]
        has_image = ctx.image_mask.any(-1)
        if c.mode == "fixed":
            exit_now = has_image
        elif c.mode == "router":
            with torch.no_grad():
                feats = router_features(ctx.hidden.float(), ctx.image_mask, ctx.valid, ctx.last, self.router_net.text)
                logits = self.router_net(ctx.layer, feats)
            exit_now = has_image & (logits[:, 1] > logits[:, 0] + c.margin)
        else:
            att, queries = ctx.attn, ctx.attn_queries  # [B, Q, L], [B, Q]
            q_ok = ctx.valid.gather(1, queries) & ~ctx.image_mask.gather(1, queries)
            mass = torch.nan_to_num((att.float() * ctx.image_mask[:, None, :]).sum(-1), nan=0.0)  # [B, Q]; padded query rows: 0
            mass = (mass * q_ok).sum(-1) / q_ok.sum(-1).clamp(min=1)
            exit_now = has_image & (mass < c.threshold)
        for i in exit_now.nonzero().flatten().tolist():
            self.exit_layers[i] = ctx.layer
        return exit_keep(ctx.image_mask, ctx.valid, exit_now)


# ---------------------------------------------------------------------------------------------------
# router training (the model frozen)


def exit_labels(full_logits: Tensor, exit_logits: Tensor, labels: Tensor, agree_min: float = 0.99, loss_ratio: float = 1.03) -> Tensor:
    """Per sample, 1 where exiting is acceptable: the exited run's argmax answer tokens agree with the full
    run's on more than ``agree_min`` of the answer positions, and its answer loss is below
    ``loss_ratio`` x the full run's. ``*_logits`` ``[B, L, V]`` predict position ``t + 1`` at ``t``;
    ``labels`` ``[B, L]`` with -100 outside the answer."""
    tgt = labels[:, 1:]
    ok = tgt != -100
    f, e = full_logits[:, :-1].float(), exit_logits[:, :-1].float()
    agree = ((f.argmax(-1) == e.argmax(-1)) & ok).sum(-1).float() / ok.sum(-1).clamp(min=1)

    def loss(lg: Tensor) -> Tensor:
        ce = torch.nn.functional.cross_entropy(lg.transpose(1, 2), tgt.clamp(min=0), reduction="none")
        return (ce * ok).sum(-1) / ok.sum(-1).clamp(min=1)

    return ((agree > agree_min) & (loss(e) < loss_ratio * loss(f))).long()


class masked_exit:
    """Context manager: from decoder layer ``layer`` on, text queries of ``model`` cannot attend the visual
    keys (``image_mask`` ``[B, L]``) — the exit computed by masking instead of removing tokens, so that every
    position keeps its place (for teacher-forced training labels, and as the tests' independent reference)."""

    def __init__(self, model: Any, layer: int, image_mask: Tensor, attention_mask: Tensor | None = None):
        self.model, self.layer = model, layer
        b, n = image_mask.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(image_mask)
        causal = torch.ones(n, n, dtype=torch.bool, device=image_mask.device).tril()
        allowed = causal[None] & valid[:, None, :]
        allowed = allowed & ~(image_mask[:, None, :] & ~image_mask[:, :, None])
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=image_mask.device)[None]
        self.allowed = allowed[:, None]
        self.handles: list[Any] = []

    def __enter__(self) -> "masked_exit":
        layers = self.model.model.language_model.layers
        for layer in list(layers)[self.layer :]:
            self.handles.append(layer.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = torch.zeros(self.allowed.shape, dtype=hidden.dtype, device=hidden.device)
        kwargs["attention_mask"] = mask.masked_fill(~self.allowed, torch.finfo(hidden.dtype).min)
        return args, kwargs

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def train_routers(
    model: Any,
    batches: Any,
    steps: int,
    hidden: int = 64,
    text: str = "after",
    layers: list[int] | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    log: Any = None,
) -> tuple[Routers, list[dict]]:
    """Train one router per decoder layer on a frozen ``model``, as DyVTE does: per batch draw an exit
    layer ``k``, run the batch in full and with every visual token removed from layer ``k`` on, label each
    sample with :func:`exit_labels`, and fit router ``k`` on the (detached) text features with
    cross-entropy. ``batches`` yields dicts with ``input_ids``, ``attention_mask``, ``pixel_values``,
    ``labels`` (-100 outside the answer) and ``prompt_len`` ``[B]`` (tokens before the answer: the router
    sees the prompt as at inference). Returns the routers and a per-step log."""
    n = model.config.text_config.num_hidden_layers
    layers = layers or list(range(1, n))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    routers = Routers(model.config.text_config.hidden_size, hidden, layers, text)
    opt = torch.optim.AdamW(routers.parameters(), lr=lr, weight_decay=0.0)
    image_id = model.config.image_token_id
    history = []
    model.eval()
    for step in range(steps):
        batch = next(batches)
        k = layers[int(torch.randint(len(layers), (1,), generator=g))]
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values")}
        with torch.no_grad():
            full = model(**inputs, output_hidden_states=True)
            with masked_exit(model, k, inputs["input_ids"] == image_id, inputs["attention_mask"]):
                exited = model(**inputs).logits
            y = exit_labels(full.logits, exited, batch["labels"])
            ids = batch["input_ids"]
            pos = torch.arange(ids.shape[1])[None]
            prompt = pos < batch["prompt_len"][:, None]
            valid = batch["attention_mask"].bool() & prompt
            feats = router_features(full.hidden_states[k].float(), ids == image_id, valid, batch["prompt_len"] - 1, text)
        logits = routers(k, feats)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = {"step": step, "layer": k, "loss": float(loss.detach()), "exit_ok": float(y.float().mean()),
               "acc": float((logits.argmax(-1) == y).float().mean())}
        history.append(rec)
        if log is not None:
            log(rec)
    return routers, history
