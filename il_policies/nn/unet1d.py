"""The 1D temporal conditional U-Net of Diffusion Policy (Chi et al. 2023, the CNN-based variant).

It maps a noisy action sequence x_k (B, T, A), the diffusion step k and a global condition c (the
flattened observation features) to the predicted noise eps (B, T, A):

    e = MLP(sinusoidal(k)),  cond = [e, c]
    down: for each width in `down_dims`: 2 residual blocks, then a stride-2 Conv1d (not after the last)
    mid:  2 residual blocks
    up:   for each width back up: concat the skip, 2 residual blocks, then a stride-2 transposed Conv1d
          (the first down level's skip is not used, as in the original)
    out:  Conv1d block, then a 1x1 Conv1d to A channels
    residual block(x, cond): h = Conv1dBlock(x); h = scale(cond) * h + bias(cond)   (FiLM)
                             h = Conv1dBlock(h); return h + Conv1d_1x1(x)
    Conv1dBlock = Conv1d(kernel_size, same padding) -> GroupNorm(n_groups) -> Mish

Time is the sequence axis: `horizon` must be divisible by 2 ** (len(down_dims) - 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn


def sinusoidal_embedding(steps: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) diffusion steps -> (B, dim): [sin(k w_i), cos(k w_i)], w_i = 10000^(-i / (dim/2 - 1))."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=steps.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = steps.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, out_channels), nn.Mish())


class ConditionalResidualBlock1d(nn.Module):
    """Two Conv1d blocks with FiLM between them: per-channel scale and bias predicted from `cond`."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.block2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.residual = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = rearrange(self.film(cond), "b (two c) -> two b c 1", two=2)
        h = self.block2(scale * self.block1(x) + bias)
        return h + self.residual(x)


class ConditionalUnet1d(nn.Module):
    def __init__(self, action_dim: int, cond_dim: int, down_dims: Sequence[int] = (512, 1024, 2048),
                 step_embed_dim: int = 128, kernel_size: int = 5, n_groups: int = 8):
        super().__init__()
        self.step_embed_dim = step_embed_dim
        self.step_encoder = nn.Sequential(nn.Linear(step_embed_dim, 4 * step_embed_dim), nn.Mish(),
                                          nn.Linear(4 * step_embed_dim, step_embed_dim))
        cond_dim = step_embed_dim + cond_dim
        block = lambda i, o: ConditionalResidualBlock1d(i, o, cond_dim, kernel_size, n_groups)  # noqa: E731
        widths = [action_dim, *down_dims]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.down = nn.ModuleList()
        for i, (w_in, w_out) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down.append(nn.ModuleList([block(w_in, w_out), block(w_out, w_out),
                                            nn.Identity() if last else nn.Conv1d(w_out, w_out, 3, stride=2, padding=1)]))
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        for w_in, w_out in reversed(pairs[1:]):  # every up level upsamples: as many as the down levels halved
            self.up.append(nn.ModuleList([block(2 * w_out, w_in), block(w_in, w_in),
                                          nn.ConvTranspose1d(w_in, w_in, 4, stride=2, padding=1)]))
        self.out = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1))
        self.downsamplings = len(down_dims) - 1

    def forward(self, sample: torch.Tensor, step: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """sample (B, T, A), step (B,) integer diffusion steps, cond (B, cond_dim) -> (B, T, A)."""
        if sample.shape[1] % (2 ** self.downsamplings):
            raise ValueError(f"the U-Net halves the horizon {self.downsamplings} times: horizon {sample.shape[1]} "
                             f"must be divisible by {2 ** self.downsamplings}")
        cond = torch.cat([self.step_encoder(sinusoidal_embedding(step, self.step_embed_dim)), cond], dim=-1)
        x = rearrange(sample, "b t a -> b a t")
        skips = []
        for block1, block2, downsample in self.down:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for block in self.mid:
            x = block(x, cond)
        for block1, block2, upsample in self.up:
            x = upsample(block2(block1(torch.cat([x, skips.pop()], dim=1), cond), cond))
        return rearrange(self.out(x), "b a t -> b t a")
