"""FlexTok (arXiv 2502.13967): an image as an ordered sequence of 1..K discrete tokens, coarse to fine.

A miniature, in one of two spaces (``latent_channels``):

- **Latent mode** (``latent_channels = C > 0``; the training script's default). As in the paper, the
  register encoder and the flow decoder work on the latent grid of an image auto-encoder, not on pixels.
  The paper uses a pretrained VAE; here (ours) a small convolutional auto-encoder (``conv_ae.py``;
  ``ae_widths``: one stage per halving, so a 96-px image becomes a ``12 x 12 x C`` grid with three
  stages) regularised by a light KL (a fixed posterior std ``ae_noise`` and a ``ae_kl`` penalty on the
  latent's square), trained first on its own and then frozen. Its latent is standardised per channel
  (``latent_mean`` / ``latent_std``, measured on training latents by the training script), cut into
  ``patch x patch``-cell patches, and the flow generates standardised latents, which the auto-encoder's
  decoder turns into pixels.
- **Pixel space** (``latent_channels = 0``, ours, the first miniature): the image itself is patchified.
  It learnt nothing beyond an image's mean colour on this CPU (docs/tokenizers.md).

The rest follows the paper in either space:

- **Encoder**: the patches, linearly embedded with learned positions, followed by ``K`` learned register
  tokens. The attention mask is the paper's *causal-last* mask: patches attend to all patches (never to
  registers); register ``j`` attends to every patch and to registers ``0..j``. The registers' outputs are
  projected to ``len(levels)`` channels and quantised by FSQ: the image's ids are the ``K`` codes, in
  register order.
- **Decoder**: a rectified-flow transformer over ``[noised patches | registers]`` (full attention) with
  adaLN-zero conditioning on the flow time; it predicts the velocity ``v = eps - x0``.
- **Training**: ``x_t = s eps + (1 - s) x0`` with ``s = sigmoid(n)``, ``n ~ N(0, 1)``; loss
  ``|v_pred - (eps - x0)|^2``. Optionally (``p_pure_noise``, ours, default 0) a share of the batch is
  trained at ``s = 1`` exactly, where the loss is a pure reconstruction from the registers (1.0 makes
  the decoder a deterministic one-step decoder, to be decoded with ``steps=1``). On this CPU the
  registers learnt more than the mean colour only that way; ``tiny-flextok`` is trained at 1.0 first,
  then continued as a rectified flow at 0.3, which keeps the registers' content (docs/tokenizers.md). *Nested
  dropout*: per image keep the first ``k`` registers, ``k`` drawn from ``1, 2, 4, ..., K`` (uniformly, as
  in the paper; ``nested_probs``, ours, weights the choices), and replace
  the rest by a learned mask token; with probability ``p_uncond`` keep none (for classifier-free guidance).
- **Decoding** any prefix ``ids[:, :k]``: registers beyond ``k`` are the mask token, then ``steps`` Euler
  steps from ``t = 1`` (noise, seeded, so decoding is deterministic) to ``t = 0``, optionally with
  classifier-free guidance ``v = v_uncond + guidance (v_cond - v_uncond)`` (the unconditional velocity
  has every register masked), or with ``norm_guidance`` its adaptive projected form (APG, Sadat et al.
  2024; :func:`normalized_guidance`), which the official FlexTok README decodes with, at scale 7.5; in
  latent mode the result is decoded to pixels by the frozen auto-encoder.

Initialisation: the (learned) patch positions start as 2-D sine-cosine embeddings (DiT keeps them fixed),
and the registers and their decoder positions start at unit scale, so that neither the registers nor the
positions are drowned by the patch content (with 0.02-scale starts the registers of an image came out
nearly identical: variance across an image's registers 0.007 against 2.7 across images; with unit-scale
starts, 1.3 against 1.8).

Departures (for a CPU-sized model): the auto-encoder is ours and tiny (trained on the synthetic scenes
only), a few transformer layers, FSQ levels configurable (the script uses the official
``[8, 8, 8, 5, 5, 5]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ImageTokenizer, to_tensor
from .conv_ae import ConvAutoEncoder
from .fsq import FSQ


@dataclass
class FlexTokConfig:
    image_size: int = 48
    patch: int = 4
    dim: int = 192
    heads: int = 4
    enc_layers: int = 4
    dec_layers: int = 4
    registers: int = 32
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    p_uncond: float = 0.1
    p_pure_noise: float = 0.0
    # nested dropout: probabilities of keeping k = 1, 2, 4, ..., K registers (ours; empty = uniform, the paper)
    nested_probs: list[float] = field(default_factory=list)
    # latent mode (ours, the paper's VAE stage in miniature): 0 = pixel space; c > 0 = the register encoder
    # and the flow decoder work on the c-channel latent grid of a small convolutional auto-encoder
    # (conv_ae.py), trained first and frozen; ``patch`` then counts latent cells
    latent_channels: int = 0
    ae_widths: list[int] = field(default_factory=lambda: [16, 48, 128])  # each stage halves the resolution
    ae_noise: float = 0.1  # the auto-encoder's fixed posterior std (light KL)
    ae_kl: float = 1e-3


class Block(torch.nn.Module):
    """Pre-LN transformer block; with ``cond`` (adaLN-zero) its norms are modulated and its residual
    branches gated by a zero-initialised projection of the condition."""

    def __init__(self, dim: int, heads: int, adaln: bool = False):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim, elementwise_affine=not adaln)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, elementwise_affine=not adaln)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))
        self.ada = None
        if adaln:
            self.ada = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(dim, 6 * dim))
            torch.nn.init.zeros_(self.ada[1].weight)
            torch.nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, mask: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        if self.ada is not None:
            s1, c1, g1, s2, c2, g2 = self.ada(cond)[:, None].chunk(6, dim=-1)
        else:
            s1 = c1 = s2 = c2 = 0.0
            g1 = g2 = 1.0
        h = self.norm1(x) * (1 + c1) + s1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(b, n, d))
        h = self.norm2(x) * (1 + c2) + s2
        return x + g2 * self.mlp(h)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = t[:, None].float() * 1000.0 * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """2-D sine-cosine position embeddings ``[grid * grid, dim]`` (MAE / DiT; RMS about 0.7): half the
    channels encode the row, half the column."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        ang = coord[:, None] * freqs[None]
        parts += [ang.sin(), ang.cos()]
    emb = torch.cat(parts, dim=-1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))


def register_mask(n_patches: int, n_registers: int, device: Any = None) -> Tensor:
    """The encoder's causal-last mask ``[N + K, N + K]`` (True = may attend)."""
    n = n_patches + n_registers
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:n_patches, :n_patches] = True
    allowed[n_patches:, :n_patches] = True
    allowed[n_patches:, n_patches:] = torch.ones(n_registers, n_registers, dtype=torch.bool, device=device).tril()
    return allowed


def normalized_guidance(v_cond: Tensor, v_uncond: Tensor, scale: float, state: dict, momentum: float = -0.5,
                        eta: float = 0.0, norm_threshold: float = 2.5) -> Tensor:
    """Adaptive projected guidance (APG; Sadat et al., 2024, arXiv 2410.02416), one decoding step.

    The guidance direction ``d = v_cond - v_uncond`` is averaged over the steps with ``momentum``
    (``state`` carries the running average from step to step: pass the same dict for one decoding),
    its norm per image is capped at ``norm_threshold``, and its component parallel to ``v_cond`` is
    scaled by ``eta``: ``v = v_cond + (scale - 1) (d_orth + eta d_par)``. The parallel component is what
    over-saturates at high scales. As the official FlexTok decoder does, it acts on the predicted
    velocity, with its constants (momentum -0.5, eta 0, threshold 2.5). The threshold is an absolute norm
    over the whole latent, so how often it binds depends on the latent's size: on ``tiny-flextok``'s
    ``8 x 12 x 12`` latent at scale 7.5 it binds at every step (8 held-out images, k = 4 and 16)."""
    diff = v_cond - v_uncond
    if momentum and "average" in state:
        diff = diff + momentum * state["average"]
    state["average"] = diff
    dims = tuple(range(1, diff.dim()))
    if norm_threshold > 0:
        norm = diff.flatten(1).norm(dim=1).view(-1, *[1] * len(dims))
        diff = diff * torch.clamp(norm_threshold / norm.clamp_min(1e-12), max=1.0)
    unit = F.normalize(v_cond.flatten(1).double(), dim=1).view_as(v_cond)
    parallel = ((diff.double() * unit).sum(dim=dims, keepdim=True) * unit).to(diff.dtype)
    return v_cond + (scale - 1) * (diff - parallel + eta * parallel)


class FlexTok(ImageTokenizer):
    kind = "flextok"
    Config = FlexTokConfig
    flexible_length = True

    def __init__(self, config: FlexTokConfig):
        super().__init__(config)
        c = config
        self.ae = None
        self.in_ch, side = 3, c.image_size
        if c.latent_channels:
            self.ae = ConvAutoEncoder(c.latent_channels, c.ae_widths, c.ae_noise, c.ae_kl)
            self.ae.requires_grad_(False)
            if c.image_size % self.ae.factor:
                raise ValueError(f"image_size {c.image_size} is not a multiple of the auto-encoder's factor {self.ae.factor}")
            self.in_ch, side = c.latent_channels, c.image_size // self.ae.factor
        # per-channel statistics that standardise the latent (set by the training script; identity in pixel space)
        self.register_buffer("latent_mean", torch.zeros(self.in_ch), persistent=self.ae is not None)
        self.register_buffer("latent_std", torch.ones(self.in_ch), persistent=self.ae is not None)
        if side % c.patch:
            raise ValueError(f"patch {c.patch} does not divide the {'latent' if self.ae else 'image'} side {side}")
        self.side = side
        self.grid = side // c.patch
        d, pd = c.dim, self.in_ch * c.patch * c.patch
        self.fsq = FSQ(c.levels)
        # encoder
        self.enc_in = torch.nn.Linear(pd, d)
        self.enc_pos = torch.nn.Parameter(sincos_2d(self.grid, d)[None])
        self.registers = torch.nn.Parameter(torch.randn(1, c.registers, d))
        self.enc = torch.nn.ModuleList([Block(d, c.heads) for _ in range(c.enc_layers)])
        self.enc_norm = torch.nn.LayerNorm(d)
        self.to_code = torch.nn.Linear(d, self.fsq.dim)
        # decoder
        self.dec_in = torch.nn.Linear(pd, d)
        self.dec_pos = torch.nn.Parameter(sincos_2d(self.grid, d)[None])
        self.from_code = torch.nn.Linear(self.fsq.dim, d)
        self.reg_pos = torch.nn.Parameter(torch.randn(1, c.registers, d))
        self.mask_token = torch.nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.time = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.SiLU(), torch.nn.Linear(d, d))
        self.dec = torch.nn.ModuleList([Block(d, c.heads, adaln=True) for _ in range(c.dec_layers)])
        self.out_norm = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.out_ada = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(d, 2 * d))
        self.out = torch.nn.Linear(d, pd)
        for m in (self.out_ada[1], self.out):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)

    @property
    def n_tokens(self) -> int:
        return self.config.registers

    # -- pixels <-> the flow's space <-> patches -------------------------------------------------
    @torch.no_grad()
    def to_flow(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> what the encoder reads and the flow generates: the images
        themselves in pixel space; in latent mode the frozen auto-encoder's latent, standardised."""
        if self.ae is None:
            return x
        return (self.ae.encode(x) - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def from_flow(self, z: Tensor) -> Tensor:
        """The inverse of :meth:`to_flow`: images in about [-1, 1]."""
        if self.ae is None:
            return z
        return self.ae.decode(z * self.latent_std[:, None, None] + self.latent_mean[:, None, None])

    def patchify(self, x: Tensor) -> Tensor:
        p, g, c = self.config.patch, self.grid, self.in_ch
        return x.view(x.shape[0], c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], g * g, c * p * p)

    def unpatchify(self, t: Tensor) -> Tensor:
        p, g, c = self.config.patch, self.grid, self.in_ch
        return t.view(t.shape[0], g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(t.shape[0], c, g * p, g * p)

    # -- encoder --------------------------------------------------------------------------------
    def encode_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` ``[B, 3, H, W]`` in [-1, 1] -> (quantised codes ``[B, K, levels]``, ids ``[B, K]``)."""
        return self.fsq(self.encode_latent(x))

    def encode_latent(self, x: Tensor) -> Tensor:
        """The registers' pre-quantisation outputs ``[B, K, len(levels)]`` for images ``x`` in [-1, 1]."""
        return self.register_outputs(self.to_flow(x))

    def register_outputs(self, z: Tensor) -> Tensor:
        """The registers' pre-quantisation outputs for an input already in the flow's space (:meth:`to_flow`)."""
        h = self.enc_in(self.patchify(z)) + self.enc_pos
        n = h.shape[1]
        h = torch.cat([h, self.registers.expand(z.shape[0], -1, -1)], dim=1)
        mask = register_mask(n, self.config.registers, z.device)
        for blk in self.enc:
            h = blk(h, mask)
        return self.to_code(self.enc_norm(h[:, n:]))

    @torch.no_grad()
    def encode(self, images: Any) -> Tensor:
        x = to_tensor(images, self.image_size).to(self.enc_pos.device) * 2 - 1
        return self.encode_codes(x)[1]

    # -- decoder --------------------------------------------------------------------------------
    def velocity(self, x_t: Tensor, t: Tensor, codes: Tensor, keep: Tensor) -> Tensor:
        """Predicted velocity for noised images ``x_t`` at times ``t`` ``[B]``, given codes ``[B, K, c]`` of
        which the first ``keep[b]`` are used (the rest replaced by the mask token)."""
        b = x_t.shape[0]
        k = self.config.registers
        reg = self.from_code(codes)
        used = torch.arange(k, device=x_t.device)[None] < keep[:, None]
        reg = torch.where(used[..., None], reg, self.mask_token.expand(b, k, -1)) + self.reg_pos
        h = torch.cat([self.dec_in(self.patchify(x_t)) + self.dec_pos, reg], dim=1)
        cond = self.time(timestep_embedding(t, self.config.dim))
        for blk in self.dec:
            h = blk(h, None, cond)
        n = self.grid * self.grid
        shift, scale = self.out_ada(cond)[:, None].chunk(2, dim=-1)
        return self.unpatchify(self.out(self.out_norm(h[:, :n]) * (1 + scale) + shift))

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Rectified-flow loss with nested dropout on a batch ``x0`` ``[B, 3, H, W]`` in [-1, 1]."""
        return self.flow_loss(self.to_flow(x0), generator)

    def flow_loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The same on a batch already in the flow's space (:meth:`to_flow`; the training script caches
        the frozen auto-encoder's latents)."""
        b, dev = x0.shape[0], x0.device
        gdev = generator.device if generator is not None else dev  # draw where the generator lives
        codes, _ = self.fsq(self.register_outputs(x0))
        k = self.config.registers
        choices = torch.tensor([2**i for i in range(int(math.log2(k)) + 1) if 2**i <= k], device=dev)
        if self.config.nested_probs:
            probs = torch.tensor(self.config.nested_probs, dtype=torch.float, device=gdev)
            if len(probs) != len(choices):
                raise ValueError(f"nested_probs has {len(probs)} entries for {len(choices)} prefix lengths {choices.tolist()}")
            pick = torch.multinomial(probs, b, replacement=True, generator=generator)
        else:
            pick = torch.randint(len(choices), (b,), generator=generator, device=gdev)
        keep = choices[pick.to(dev)]
        uncond = torch.rand(b, generator=generator, device=gdev).to(dev) < self.config.p_uncond
        keep = torch.where(uncond, torch.zeros_like(keep), keep)
        s = torch.sigmoid(torch.randn(b, generator=generator, device=gdev)).to(dev)
        if self.config.p_pure_noise > 0:
            pure = torch.rand(b, generator=generator, device=gdev).to(dev) < self.config.p_pure_noise
            s = torch.where(pure, torch.ones_like(s), s)
        eps = torch.randn(x0.shape, generator=generator, device=gdev).to(dev)
        x_t = s[:, None, None, None] * eps + (1 - s[:, None, None, None]) * x0
        v = self.velocity(x_t, s, codes, keep)
        return F.mse_loss(v, eps - x0)

    @torch.no_grad()
    def decode(self, ids: Tensor, steps: int = 25, guidance: float = 1.0, seed: int = 0,
               norm_guidance: bool = False) -> Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] from ids ``[B, k]`` (any ``1 <= k <= K``). ``guidance`` != 1:
        classifier-free guidance of that scale, in its APG form (:func:`normalized_guidance`) with
        ``norm_guidance``."""
        if norm_guidance and guidance == 1.0:
            raise ValueError("norm_guidance shapes classifier-free guidance: give a guidance scale other than 1")
        b, k = ids.shape
        if not 0 <= k <= self.config.registers:
            raise ValueError(f"FlexTok decodes 0..{self.config.registers} tokens, got {k}")
        dev = self.enc_pos.device
        full = torch.zeros(b, self.config.registers, dtype=torch.long, device=dev)
        full[:, :k] = ids.to(dev)
        codes = self.fsq.indices_to_codes(full)
        keep = torch.full((b,), k, device=dev)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(b, self.in_ch, self.side, self.side, generator=g).to(dev)
        ts = torch.linspace(1.0, 0.0, steps + 1, device=dev)
        state: dict = {}
        for i in range(steps):
            t = ts[i].expand(b)
            v = self.velocity(x, t, codes, keep)
            if guidance != 1.0:
                v0 = self.velocity(x, t, codes, torch.zeros_like(keep))
                v = normalized_guidance(v, v0, guidance, state) if norm_guidance else v0 + guidance * (v - v0)
            x = x - (ts[i] - ts[i + 1]) * v
        return ((self.from_flow(x).clamp(-1, 1) + 1) / 2).float()
