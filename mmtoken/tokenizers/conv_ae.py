"""A small convolutional auto-encoder: images to a low-resolution latent grid and back.

FlexTok's first stage (ours): the paper runs its register encoder and flow decoder on the latent grid of a
pretrained VAE, not on pixels; this is a miniature of that VAE for the synthetic world's scenes. Each of
``len(widths)`` stages halves the resolution (a ``96 x 96`` image with three stages becomes a ``12 x 12 x
channels`` grid). The first stage folds 2 x 2 pixels into channels (pixel unshuffle) and the decoder's last
unfolds them (pixel shuffle), so no convolution runs at full resolution.

Regularisation is a light KL (a VAE whose posterior has a fixed standard deviation ``noise``): in training
the decoder sees ``z + noise * eps`` and the loss adds ``kl * mean(z^2)`` (the KL to a unit Gaussian up to
constants), which pins the latent's scale and makes the decoder tolerant of small latent errors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ResBlock(torch.nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.c1 = torch.nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = torch.nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.c2(F.gelu(self.c1(F.gelu(x))))


class ConvAutoEncoder(torch.nn.Module):
    def __init__(self, channels: int, widths: list[int], noise: float = 0.1, kl: float = 1e-3):
        super().__init__()
        if not widths:
            raise ValueError("ConvAutoEncoder needs at least one stage")
        self.channels, self.widths, self.noise, self.kl = channels, list(widths), noise, kl
        w = widths
        enc: list[torch.nn.Module] = [torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(12, w[0], 3, padding=1), ResBlock(w[0])]
        for a, b in zip(w[:-1], w[1:]):
            enc += [torch.nn.Conv2d(a, b, 4, stride=2, padding=1), ResBlock(b)]
        enc += [torch.nn.GELU(), torch.nn.Conv2d(w[-1], channels, 1)]
        self.encoder = torch.nn.Sequential(*enc)
        dec: list[torch.nn.Module] = [torch.nn.Conv2d(channels, w[-1], 3, padding=1), ResBlock(w[-1])]
        for a, b in zip(w[::-1][:-1], w[::-1][1:]):
            dec += [torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(a, b, 3, padding=1), ResBlock(b)]
        dec += [torch.nn.GELU(), torch.nn.Conv2d(w[0], 12, 3, padding=1), torch.nn.PixelShuffle(2)]
        self.decoder = torch.nn.Sequential(*dec)

    @property
    def factor(self) -> int:
        """How many pixels one latent cell covers along each side."""
        return 2 ** len(self.widths)

    def encode(self, x: Tensor) -> Tensor:
        """``x`` ``[B, 3, H, W]`` in [-1, 1] -> latent ``[B, channels, H / factor, W / factor]``."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Latent -> image ``[B, 3, H, W]``, about [-1, 1] (not clamped)."""
        return self.decoder(z)

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(total loss, reconstruction MSE) on images ``x`` in [-1, 1]."""
        z = self.encode(x)
        eps = torch.randn(z.shape, generator=generator).to(z.device)
        rec = F.mse_loss(self.decode(z + self.noise * eps), x)
        return rec + self.kl * z.pow(2).mean(), rec
