"""A sequence VAE over observation sequences: a latent state-space model (the lecture's "sequence-level
conditional VAE", shared/seeds/lecture-vae-cvae-act.txt), conditioned on actions through its prior.

    filter (encoder)   q(z_t | o_<=t)           = N(mu_t, s_t^2),  (mu_t, s_t) = head(GRU(e_1 .. e_t)),  e_t = enc(o_t)
    prior              p(z_1) = N(0, I),  p(z_t | z_t-1, a_t-1) = N(z_t-1 + f(z_t-1, a_t-1), g(z_t-1, a_t-1)^2)
    decoder            p(o_t | z_t, o_c)        = N(dec(z_t, o_c), I)  (normalized units; o_c: a context frame)

The filter reads observations only, as the lecture's encoder "infers z_t given the history of
observations": the actions enter through the learned dynamics of the prior, and a policy on z_t
needs nothing but the robot's observations. The decoder is independent per step; it also sees the
feature maps of one context frame o_c (the window's first frame in training, the last observed frame
when imagining) through skip connections and draws o_t as o_c plus a change, as the video-prediction
report's encoder-decoder with skips (and SVG) does: what stays still comes from o_c, and z_t only has
to carry what moves. `change_mask=True` gates the change per pixel, o_t = o_c + sigmoid(m) * change, as
the compositing masks of Finn et al. (2016): a saturated mask copies o_c exactly where nothing moves.
`skip_context=False` gives the plain p(o_t | z_t).

Shapes: images `(B, T, C, H, W)` normalized and already at `frame_size`; low-dim `(B, T, D)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from il_policies.nn.mlp import mlp
from il_policies.nn.vae import gaussian_from_output


class FrameEncoder(nn.Module):
    """One step's observation -> a feature vector (and, for images, the feature maps of each stage
    for the decoder's skip connections). Images: stride-2 4x4 convolutions, one stage per width
    (64x64 -> 4x4 with four); low-dim inputs join the flattened map."""

    def __init__(self, image_channels: int, frame_size: int, low_dim: int, channels: Sequence[int], feature_dim: int):
        super().__init__()
        self.stages = nn.ModuleList()
        width, size = image_channels, frame_size
        for out in channels if image_channels else ():
            self.stages.append(nn.Sequential(nn.Conv2d(width, out, 4, stride=2, padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU()))
            width, size = out, size // 2
        flat = width * size * size if image_channels else 0
        self.project = nn.Sequential(nn.Linear(flat + low_dim, feature_dim), nn.LayerNorm(feature_dim), nn.SiLU())

    def forward(self, image: torch.Tensor | None, low_dim: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips, parts = [], []
        if image is not None:
            x = image
            for stage in self.stages:
                x = stage(x)
                skips.append(x)
            parts.append(x.flatten(1))
        if low_dim is not None:
            parts.append(low_dim)
        return self.project(torch.cat(parts, dim=-1)), skips


class FrameDecoder(nn.Module):
    """z_t [+ the context frame's feature maps and image] -> the mean of o_t: an image (the encoder's
    stages mirrored by stride-2 transposed convolutions, each reading the context frame's map of its
    input size beside its own) and the low-dim vector."""

    def __init__(self, latent_dim: int, image_channels: int, frame_size: int, low_dim: int, channels: Sequence[int],
                 hidden_dim: int, skip_context: bool, change_mask: bool = False):
        super().__init__()
        self.skip_context = skip_context and bool(image_channels)
        self.change_mask = change_mask and self.skip_context
        self.image_channels = image_channels
        if image_channels:
            widths = list(channels)[::-1]  # deepest first
            self.grid = frame_size // 2 ** len(widths)
            self.to_grid = nn.Linear(latent_dim, widths[0] * self.grid * self.grid)
            inputs = 2 if self.skip_context else 1
            self.ups = nn.ModuleList()
            for i, width in enumerate(widths):
                last = i + 1 == len(widths)
                out = image_channels + int(self.change_mask) if last else widths[i + 1]  # (+ the mask's logit)
                up = nn.ConvTranspose2d(inputs * width, out, 4, stride=2, padding=1)
                self.ups.append(up if last else nn.Sequential(up, nn.GroupNorm(min(8, widths[i + 1]), widths[i + 1]), nn.SiLU()))
            if self.skip_context:  # o_t = o_c + change: a change of 0 (o_c itself) at initialization, masked or not
                nn.init.zeros_(self.ups[-1].weight)
                nn.init.zeros_(self.ups[-1].bias)
        self.low_dim_head = mlp(latent_dim, (hidden_dim,), low_dim) if low_dim else None

    def forward(self, z: torch.Tensor, context: tuple[torch.Tensor, list[torch.Tensor]] | None = None):
        """`z` `(N, latent)`; `context` (image `(N, C, H, W)`, its skip maps shallowest first) when
        `skip_context`. -> (image `(N, C, H, W)` or None, low-dim `(N, D)` or None)."""
        image = None
        if self.image_channels:
            x = F.silu(rearrange(self.to_grid(z), "n (c h w) -> n c h w", h=self.grid, w=self.grid))
            skips = context[1][::-1] if self.skip_context else [None] * len(self.ups)
            for up, skip in zip(self.ups, skips):
                x = up(x if skip is None else torch.cat([x, skip], dim=1))
            if self.change_mask:
                x = torch.sigmoid(x[:, -1:]) * x[:, :-1]
            image = x + context[0] if self.skip_context else x
        low = self.low_dim_head(z) if self.low_dim_head is not None else None
        return image, low


@dataclass
class TeacherForcingSchedule:
    """The probability that a step of the multi-step prediction starts from the filtered state (the
    teacher) rather than from the model's own previous prediction, as the report's decaying ratio:
    `start` until `decay_start`, then linearly to `end` over `decay_steps`."""

    start: float = 1.0
    end: float = 1.0
    decay_start: int = 0
    decay_steps: int = 1000

    def __post_init__(self):
        if not (0.0 <= self.end <= 1.0 and 0.0 <= self.start <= 1.0):
            raise ValueError(f"teacher forcing ratios must lie in [0, 1], got start {self.start} and end {self.end}")

    def __call__(self, step: int) -> float:
        progress = min(1.0, max(0, step - self.decay_start) / max(1, self.decay_steps))
        return self.start + (self.end - self.start) * progress


class SequenceVAE(nn.Module):
    """The filter, the prior's dynamics and the decoder (see the module docstring)."""

    def __init__(self, image_channels: int, frame_size: int, low_dim: int, action_dim: int, latent_dim: int = 32,
                 channels: Sequence[int] = (16, 32, 64, 128), feature_dim: int = 256, hidden_dim: int = 256,
                 skip_context: bool = True, scale: str = "softplus", change_mask: bool = False):
        super().__init__()
        self.latent_dim, self.scale = latent_dim, scale
        self.encoder = FrameEncoder(image_channels, frame_size, low_dim, channels, feature_dim)
        self.filter = nn.GRU(feature_dim, hidden_dim, batch_first=True)
        self.posterior_head = nn.Linear(hidden_dim, 2 * latent_dim)
        self.dynamics = mlp(latent_dim + action_dim, (hidden_dim, hidden_dim), 2 * latent_dim, activation=nn.SiLU)
        self.decoder = FrameDecoder(latent_dim, image_channels, frame_size, low_dim, channels, hidden_dim, skip_context, change_mask)

    def encode(self, image: torch.Tensor | None, low_dim: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`(B, T, ...)` -> features `(B, T, F)` and each step's skip maps `(B, T, C, h, w)`."""
        b = (image if image is not None else low_dim).shape[0]
        flat = lambda x: None if x is None else rearrange(x, "b t ... -> (b t) ...")  # noqa: E731
        features, skips = self.encoder(flat(image), flat(low_dim))
        return rearrange(features, "(b t) f -> b t f", b=b), [rearrange(s, "(b t) ... -> b t ...", b=b) for s in skips]

    def posterior(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features `(B, T, F)` -> q(z_t | o_<=t) for every t: (mu, std, logvar), each `(B, T, latent)`.
        Causal: the GRU reads the steps in order."""
        return gaussian_from_output(self.posterior_head(self.filter(features)[0]), self.scale)

    def transition(self, z: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(z_t+1 | z_t, a_t): (mu, std, logvar) for any leading shape; the mean is z_t plus a change."""
        mu_change, raw = self.dynamics(torch.cat([z, action], dim=-1)).chunk(2, dim=-1)
        return gaussian_from_output(torch.cat([z + mu_change, raw], dim=-1), self.scale)

    def predict(self, z_teacher: torch.Tensor, actions: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-step prediction with teacher forcing: the prior of step t, p(z_t | x_t-1, a_t-1), where
        x_t-1 is the filtered state z_t-1 where `teacher[:, t-1]`, else the mean predicted for step t-1
        (an open-loop chain from the last teacher-forced step). `z_teacher` `(B, T, latent)`, `actions`
        `(B, T-1, A)`, `teacher` `(B, T-1)` bool -> (mu, logvar), each `(B, T-1, latent)` for steps 2..T.
        All True: the one-step model p(z_t | z_t-1, a_t-1)."""
        means, logvars, previous = [], [], z_teacher[:, 0]
        for t in range(1, z_teacher.shape[1]):
            start = torch.where(teacher[:, t - 1, None], z_teacher[:, t - 1], previous)
            previous, _, logvar = self.transition(start, actions[:, t - 1])
            means.append(previous)
            logvars.append(logvar)
        return torch.stack(means, dim=1), torch.stack(logvars, dim=1)

    def decode(self, z: torch.Tensor, context_image: torch.Tensor | None, context_skips: list[torch.Tensor]):
        """`z` `(B, T, latent)` decoded against one context frame per sample (`(B, C, H, W)` and its skip
        maps `(B, C, h, w)`) -> (image `(B, T, C, H, W)` or None, low-dim `(B, T, D)` or None)."""
        b, t = z.shape[:2]
        context = None
        if self.decoder.skip_context:
            context = (repeat(context_image, "b ... -> (b t) ...", t=t), [repeat(s, "b ... -> (b t) ...", t=t) for s in context_skips])
        image, low = self.decoder(rearrange(z, "b t d -> (b t) d"), context)
        unflat = lambda x: None if x is None else rearrange(x, "(b t) ... -> b t ...", b=b)  # noqa: E731
        return unflat(image), unflat(low)

    @torch.no_grad()
    def imagine(self, image: torch.Tensor | None, low_dim: torch.Tensor | None, actions: torch.Tensor):
        """Filter the context `(B, C_steps, ...)`, then predict open loop from its last state with the
        given actions `(B, n, A)` (a_c .. a_c+n-1): -> the decoded means of steps c+1 .. c+n, decoded
        against the last context frame: (image `(B, n, C, H, W)` or None, low-dim or None)."""
        features, skips = self.encode(image, low_dim)
        z = self.posterior(features)[0][:, -1]
        predicted = []
        for k in range(actions.shape[1]):
            z = self.transition(z, actions[:, k])[0]
            predicted.append(z)
        last_image = image[:, -1] if image is not None else None
        return self.decode(torch.stack(predicted, dim=1), last_image, [s[:, -1] for s in skips])


__all__ = ["FrameDecoder", "FrameEncoder", "SequenceVAE", "TeacherForcingSchedule"]
