"""SEED (arXiv 2307.08041, 2310.01218): an image as 32 discrete tokens with a causal order and high-level
semantics. A faithful miniature:

- **Frozen ViT**: a CLIP vision tower (for ``tiny-seed``, the shipped tiny-llava's own, copied into the
  checkpoint); its patch features of layer ``feature_layer``.
- **Causal Q-Former**: ``queries`` learned queries; each layer applies *causal* self-attention among the
  queries (query ``j`` sees queries ``0..j``), cross-attention to the ViT features, and an MLP.
- **VQ**: the queries' outputs are projected to ``code_dim`` and quantised to the nearest of ``codes``
  codebook vectors (L2-normalised, as the official code), straight-through, codebook + commitment
  (``beta`` 0.25) losses; usage is counted per code.
- **Decoder**: transformer blocks over the quantised codes reconstruct the causal Q-Former embeddings
  (cosine loss); a learned query reads them into a *generation embedding*, regressed (MSE) onto the image
  embedding a generator is conditioned on, standing in for unCLIP's CLIP image embedding: with
  ``gen_grid = 0`` the frozen ViT's pooled (CLS) embedding, one vector as in the paper; with
  ``gen_grid = g`` (ours) its ``feature_layer`` patch features average-pooled to a ``g x g`` grid, ``g * g``
  vectors that keep the layout (a pixel decoder fed the true 4 x 4 grid reaches a pixel MSE of 0.003,
  fed the true CLS vector 0.011 — little more than the background; but from the 32 codes neither target
  is predicted well enough to matter: see docs/tokenizers.md). A small pixel decoder turns the embedding
  into an image (standing in for the diffusion decoder; trained with a pixel MSE on the generation
  embedding's target).
- **Training** (``scripts/train_seed.py``): stage 1, contrastive: the last causal query's embedding against
  a caption embedding (InfoNCE); stage 2, the Q-Former frozen (its causal embeddings are the targets):
  ``5 L_VQ + 2 (1 - cos) + 0.5 MSE`` (+ the pixel decoder's loss), with an optional dead-code restart
  (ours) that keeps the codebook in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ImageTokenizer, to_tensor


@dataclass
class SeedConfig:
    image_size: int = 96
    vision: dict | None = None  # CLIPVisionConfig fields of the frozen ViT
    feature_layer: int = -2
    dim: int = 192
    heads: int = 4
    qformer_layers: int = 2
    decoder_layers: int = 2
    queries: int = 32
    code_dim: int = 32
    codes: int = 1024
    beta: float = 0.25
    pixel_base: int = 12  # the pixel decoder starts from a pixel_base x pixel_base grid
    gen_grid: int = 0  # 0: generation embedding = the ViT's pooled vector; g: its patch features pooled to g x g


class QFormerLayer(torch.nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.n1, self.n2, self.n3 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.self_attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross = torch.nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, q: Tensor, kv: Tensor | None, causal: Tensor) -> Tensor:
        h = self.n1(q)
        q = q + self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        if kv is not None:
            h = self.n2(q)
            q = q + self.cross(h, kv, kv, need_weights=False)[0]
        return q + self.mlp(self.n3(q))


def causal_mask(n: int, device: Any = None) -> Tensor:
    """Boolean ``[n, n]``, True where attention is *not* allowed (``torch.nn.MultiheadAttention``'s
    convention): query ``j`` sees ``0..j``."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class VectorQuantizer(torch.nn.Module):
    def __init__(self, codes: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.embedding = torch.nn.Parameter(torch.randn(codes, dim))
        self.register_buffer("usage", torch.zeros(codes, dtype=torch.long))

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding, dim=-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z`` ``[..., d]`` -> (quantised, straight-through ``[..., d]``; ids; VQ loss)."""
        z = F.normalize(z, dim=-1)
        book = self.codebook()
        ids = (z @ book.t()).argmax(-1)  # nearest neighbour of unit vectors
        q = book[ids]
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        if self.training:
            self.usage += torch.bincount(ids.flatten(), minlength=self.usage.numel())
            self._last_z = z.detach().reshape(-1, z.shape[-1])
        return z + (q - z).detach(), ids, loss

    @torch.no_grad()
    def restart_dead(self, since: Tensor, generator: torch.Generator | None = None) -> int:
        """Codes not chosen since the usage snapshot ``since`` move onto randomly drawn encoder outputs of
        the last training batch (dead-code restart — ours, not in the papers; ``restart_every`` in the
        training script). Returns how many moved."""
        dead = torch.nonzero(self.usage == since).flatten()
        z = getattr(self, "_last_z", None)
        if dead.numel() == 0 or z is None:
            return 0
        pick = torch.randint(z.shape[0], (dead.numel(),), generator=generator).to(z.device)
        noise = 0.01 * torch.randn(dead.numel(), z.shape[1], generator=generator).to(z.device)
        self.embedding[dead] = F.normalize(z[pick] + noise, dim=-1)
        return int(dead.numel())


class Seed(ImageTokenizer):
    kind = "seed"
    Config = SeedConfig

    def __init__(self, config: SeedConfig):
        super().__init__(config)
        from transformers import CLIPVisionConfig, CLIPVisionModel

        c = config
        self.vit = CLIPVisionModel(CLIPVisionConfig(**(c.vision or {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 6,
                                                                       "num_attention_heads": 3, "image_size": c.image_size, "patch_size": 8})))
        self.vit.requires_grad_(False)
        vd = self.vit.config.hidden_size
        self.queries = torch.nn.Parameter(torch.randn(1, c.queries, c.dim) * 0.02)
        self.qformer = torch.nn.ModuleList([QFormerLayer(c.dim, c.heads, vd) for _ in range(c.qformer_layers)])
        self.q_norm = torch.nn.LayerNorm(c.dim)
        self.to_code = torch.nn.Linear(c.dim, c.code_dim)
        self.vq = VectorQuantizer(c.codes, c.code_dim, c.beta)
        self.from_code = torch.nn.Linear(c.code_dim, c.dim)
        self.dec_pos = torch.nn.Parameter(torch.randn(1, c.queries, c.dim) * 0.02)
        self.decoder = torch.nn.ModuleList([QFormerLayer(c.dim, c.heads, c.dim) for _ in range(c.decoder_layers)])
        self.dec_norm = torch.nn.LayerNorm(c.dim)
        self.gen_query = torch.nn.Parameter(torch.randn(1, max(1, c.gen_grid) ** 2, c.dim) * 0.02)
        self.gen_attn = torch.nn.MultiheadAttention(c.dim, c.heads, batch_first=True)
        self.gen_out = torch.nn.Linear(c.dim, vd)
        b = c.pixel_base
        entry = {"fc": torch.nn.Linear(vd, 64 * b * b)} if not c.gen_grid else {
            "proj": torch.nn.Sequential(torch.nn.Conv2d(vd, 64, 1), torch.nn.Upsample(size=(b, b), mode="bilinear"))}
        self.pixel = torch.nn.ModuleDict({
            **entry,
            "up": torch.nn.Sequential(
                torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.GELU(),
                torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(64, 32, 3, padding=1), torch.nn.GELU(),
                torch.nn.Upsample(size=(c.image_size, c.image_size)), torch.nn.Conv2d(32, 3, 3, padding=1),
            ),
        })

    @property
    def n_tokens(self) -> int:
        return self.config.queries

    def vit_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen ViT on ``x`` ``[B, 3, H, W]`` in [0, 1] (CLIP normalisation mean = std = 0.5): patch
        features of ``feature_layer`` and the image embedding the generation embedding regresses onto
        (``[B, vd]``, or ``[B, g * g, vd]`` with ``gen_grid = g``)."""
        with torch.no_grad():
            out = self.vit(pixel_values=(x - 0.5) / 0.5, output_hidden_states=True)
        feats = out.hidden_states[self.config.feature_layer][:, 1:]
        g = self.config.gen_grid
        if not g:
            return feats, out.pooler_output
        side = int(round(feats.shape[1] ** 0.5))
        grid = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side), g)
        return feats, grid.flatten(2).transpose(1, 2)

    def qformer_out(self, feats: Tensor) -> Tensor:
        q = self.queries.expand(feats.shape[0], -1, -1)
        mask = causal_mask(q.shape[1], q.device)
        for layer in self.qformer:
            q = layer(q, feats, mask)
        return self.q_norm(q)

    def quantize(self, x: Tensor) -> dict[str, Tensor]:
        feats, pooled = self.vit_features(x)
        emb = self.qformer_out(feats)
        z, ids, vq_loss = self.vq(self.to_code(emb))
        return {"embeddings": emb, "codes": z, "ids": ids, "vq_loss": vq_loss, "image_embedding": pooled}

    def decode_codes(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Quantised codes ``[B, K, code_dim]`` -> (reconstructed Q-Former embeddings, generation embedding)."""
        h = self.from_code(codes) + self.dec_pos[:, : codes.shape[1]]
        mask = causal_mask(h.shape[1], h.device)
        for layer in self.decoder:
            h = layer(h, None, mask)
        h = self.dec_norm(h)
        g = self.gen_out(self.gen_attn(self.gen_query.expand(h.shape[0], -1, -1), h, h, need_weights=False)[0])
        return h, (g if self.config.gen_grid else g[:, 0])

    def pixels(self, gen: Tensor) -> Tensor:
        b, g = self.config.pixel_base, self.config.gen_grid
        if g:
            x = self.pixel["proj"](gen.transpose(1, 2).reshape(gen.shape[0], -1, g, g))
        else:
            x = self.pixel["fc"](gen).view(gen.shape[0], 64, b, b)
        return torch.sigmoid(self.pixel["up"](x))

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        """Stage-2 losses on images ``x`` ``[B, 3, H, W]`` in [0, 1]."""
        out = self.quantize(x)
        rec, gen = self.decode_codes(out["codes"])
        cos = 1 - F.cosine_similarity(rec, out["embeddings"].detach(), dim=-1).mean()
        mse = F.mse_loss(gen, out["image_embedding"])
        pix = F.mse_loss(self.pixels(out["image_embedding"]), x)  # the pixel decoder learns on the true embedding
        total = 5 * out["vq_loss"] + 2 * cos + 0.5 * mse + pix
        return {"loss": total, "vq": out["vq_loss"], "cos": cos, "mse": mse, "pixel": pix}

    @torch.no_grad()
    def encode(self, images: Any) -> Tensor:
        x = to_tensor(images, self.image_size).to(self.queries.device)
        return self.quantize(x)["ids"]

    @torch.no_grad()
    def decode(self, ids: Tensor, **kwargs: Any) -> Tensor:
        codes = self.vq.codebook()[ids.to(self.queries.device)]
        _, gen = self.decode_codes(codes)
        return self.pixels(gen).clamp(0, 1)
