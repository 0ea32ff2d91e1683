"""The encoder/decoder pair of BVAE and its baselines (VAE+NN, and BC with the same encoder).

Image family (one camera image, or several frames/cameras stacked along channels, plus optional
low-dim inputs). With the defaults below and a 3x224x224 image, a 7-dim latent and no low-dim
inputs, it is exactly the original BVAE network of the writeup (24,520 parameters):

    encoder  Conv(C->c0,k2,s2) MaxPool(2) Norm LReLU(0.2) | Conv(c0->c1,k2,s2) |
             Conv(c1->c2,k2,s2) MaxPool(2,pad 1) Norm LReLU | Conv(c2->c3,k2,s2) MaxPool(2) Norm LReLU |
             Flatten (c3 x 2 x 2) [+ low-dim] -> Linear(., hidden) ReLU -> Linear(hidden, 2 * latent)
    decoder  Linear(latent, hidden) ReLU -> Linear(hidden, c3 x 2 x 2) LReLU -> reshape (c3, 2, 2) ->
             3 x [ConvTranspose(k2,s2) -> bilinear Upsample to the next size -> Norm -> LReLU(0.2)],
             channels c3 -> c2 -> c1 -> 2C, sizes 2 -> 4 -> 8 -> 16 -> 28 -> 56 -> 224
             [+ Linear(hidden, 2 * low_dim) from the decoder's hidden layer]

Other image sizes keep the same layer sequence (and parameter count): a strided conv that would
shrink the map below the 2x2 grid becomes a stride-1 conv (on a zero-padded map at the grid size),
such a max-pool is dropped, an adaptive max-pool brings the map to exactly 2x2 when needed (84x84:
84 -> 42 -> 21 -> 10 -> 5 -> 3 -> 2, no adaptive pool), and the decoder's upsampling targets
(default: a geometric progression, 84: 7, 24, 84) end at exactly the image size. `output_activation=False` leaves the decoder's last block linear (no Norm/LReLU), so the
normalized image can take any value; the original squashes it with BatchNorm + LeakyReLU.

The encoder returns `out_dim` values: `2 * latent` (mean, raw scale) in a VAE, the action chunk
itself when BC uses it (`policy=bc_conv_vae`); the decoder returns the mean and raw
scale of the observation: an image of `2 * C` channels (C mean channels, then C scale channels)
and, with low-dim inputs, `2 * low_dim` values. Turning a raw scale into a standard deviation is
the caller's choice (`il_policies.nn.vae.std_from_raw`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from il_policies.nn.mlp import mlp

ORIGINAL_CHANNELS = (12, 12, 24, 48)
ORIGINAL_HIDDEN = 28
ORIGINAL_UPSAMPLE_SIZES = (8, 28, 224)
GRID = 2  # the encoder's last feature map is GRID x GRID


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = max(g for g in (4, 3, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use batch, group or none")


@contextlib.contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside, the BatchNorm layers of `module` still normalize a training batch by its own
    statistics but leave their running statistics (used in eval mode) as they are: for a pass over
    inputs unlike those the module sees at inference (BVAE's decoded observations, sampled latents)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0  # running = (1 - momentum) * running + momentum * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _down(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ConvImageEncoder(nn.Module):
    """`(B, C, H, W)` normalized image [+ `(B, low_dim)`] -> `(B, out_dim)`: `2 * latent_dim` (mean,
    raw scale) as a VAE's encoder, the action chunk itself as BC's."""

    def __init__(
        self,
        in_channels: int,
        image_size: Sequence[int] | int,
        out_dim: int,
        low_dim: int = 0,
        channels: Sequence[int] = ORIGINAL_CHANNELS,
        hidden_dim: int = ORIGINAL_HIDDEN,
        norm: str = "batch",
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"the conv VAE family has 4 conv stages: give 4 channel widths, got {list(channels)}")
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        c0, c1, c2, c3 = channels
        size = [height, width]
        layers: list[nn.Module] = []

        def conv(cin: int, cout: int) -> None:
            # Stride 2 unless that would take the map below the grid: then stride 1 (one pixel
            # smaller), or at the grid size, stride 1 on a zero-padded map (size kept).
            stride = 2 if min(_down(s, 2, 2) for s in size) >= GRID else 1
            if stride == 1 and min(size) - 1 < GRID:
                layers.append(nn.ZeroPad2d((0, 1, 0, 1)))
                size[:] = [s + 1 for s in size]
            layers.append(nn.Conv2d(cin, cout, kernel_size=2, stride=stride))
            size[:] = [_down(s, 2, stride) for s in size]

        def pool(padding: int = 0) -> None:
            if min(_down(s, 2, 2, padding) for s in size) >= GRID:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, padding=padding))
                size[:] = [_down(s, 2, 2, padding) for s in size]

        conv(in_channels, c0)
        pool()
        layers += [_norm(norm, c0), nn.LeakyReLU(0.2, inplace=True)]
        conv(c0, c1)
        conv(c1, c2)
        pool(padding=1)
        layers += [_norm(norm, c2), nn.LeakyReLU(0.2, inplace=True)]
        conv(c2, c3)
        pool()
        layers += [_norm(norm, c3), nn.LeakyReLU(0.2, inplace=True)]
        if size != [GRID, GRID]:
            layers.append(nn.AdaptiveMaxPool2d(GRID))
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.low_dim = int(low_dim)
        self.head = nn.Sequential(nn.Linear(c3 * GRID * GRID + self.low_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, image: torch.Tensor, low_dim: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(image)
        if self.low_dim:
            features = torch.cat([features, low_dim], dim=-1)
        return self.head(features)


def default_upsample_sizes(size: int, n_blocks: int = 3) -> tuple[int, ...]:
    """Sizes after each decoder block: geometric from GRID to `size`, ending at exactly `size`."""
    sizes = [max(2, round(GRID * (size / GRID) ** ((i + 1) / n_blocks))) for i in range(n_blocks)]
    sizes[-1] = int(size)
    return tuple(sizes)


class ConvImageDecoder(nn.Module):
    """`(B, latent_dim)` -> image `(B, 2 * C, H, W)` [and `(B, 2 * low_dim)`]: means then raw scales."""

    def __init__(
        self,
        out_channels: int,
        image_size: Sequence[int] | int,
        latent_dim: int,
        low_dim: int = 0,
        channels: Sequence[int] = ORIGINAL_CHANNELS,
        hidden_dim: int = ORIGINAL_HIDDEN,
        norm: str = "batch",
        upsample_sizes: Sequence[Sequence[int] | int] | None = None,
        output_activation: bool = True,
    ):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if upsample_sizes is None:
            upsample_sizes = list(zip(default_upsample_sizes(height), default_upsample_sizes(width)))
        targets = [(s, s) if isinstance(s, int) else tuple(s) for s in upsample_sizes]
        if len(targets) != 3 or targets[-1] != (height, width):
            raise ValueError(
                f"upsample_sizes must give 3 sizes ending at the image size {height}x{width}, got {list(upsample_sizes)} "
                "(the original's [8, 28, 224] fit 224x224 images: set policy.upsample_sizes=null for a geometric progression)"
            )
        c3 = channels[3]
        self.grid_channels = c3
        self.low_dim = int(low_dim)
        self.mlp = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.ReLU())
        self.to_grid = nn.Sequential(nn.Linear(hidden_dim, c3 * GRID * GRID), nn.LeakyReLU())
        widths = [c3, channels[2], channels[1], 2 * out_channels]
        blocks: list[nn.Module] = []
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            blocks += [
                nn.ConvTranspose2d(widths[i], widths[i + 1], kernel_size=2, stride=2),
                nn.Upsample(size=target, mode="bilinear"),
            ]
            if output_activation or not last:
                blocks += [_norm(norm, widths[i + 1]), nn.LeakyReLU(0.2, inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.low_dim_head = nn.Linear(hidden_dim, 2 * self.low_dim) if self.low_dim else None

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.mlp(latent)
        grid = self.to_grid(hidden).reshape(-1, self.grid_channels, GRID, GRID)
        image = self.blocks(grid)
        low = self.low_dim_head(hidden) if self.low_dim_head is not None else None
        return image, low


class MLPEncoder(nn.Module):
    """Low-dim observations: `obs_dim -> h -> h -> out_dim`."""

    def __init__(self, obs_dim: int, out_dim: int, hidden_dims: Sequence[int] = (256, 256)):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, out_dim)
        self.out_dim = out_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class MLPDecoder(nn.Module):
    """`latent_dim -> h -> h -> 2 * obs_dim` (means, then raw scales)."""

    def __init__(self, latent_dim: int, obs_dim: int, hidden_dims: Sequence[int] = (256, 256)):
        super().__init__()
        self.net = mlp(latent_dim, hidden_dims, 2 * obs_dim)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.net(latent)


def original_bvae_networks(latent_dim: int = 7) -> tuple[ConvImageEncoder, ConvImageDecoder]:
    """The writeup's exact 224x224 RGB encoder and decoder (24,520 parameters for a 7-dim latent)."""
    encoder = ConvImageEncoder(3, 224, 2 * latent_dim)
    decoder = ConvImageDecoder(3, 224, latent_dim, upsample_sizes=ORIGINAL_UPSAMPLE_SIZES)
    return encoder, decoder


def count_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


__all__ = [
    "ConvImageDecoder", "ConvImageEncoder", "MLPDecoder", "MLPEncoder", "count_parameters",
    "default_upsample_sizes", "original_bvae_networks",
]
