"""Pictures of what a generative policy learned: latent traversal grids and tiled image pairs, as PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange


def display_image(policy, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Normalized `{key: (B, T, C, H, W)}` -> the first camera's last frame, raw `(B, 3, H, W)` in [0, 1]."""
    key = policy.vae.rgb_keys[0]
    image = policy.normalizer.unnormalize(key, obs[key])[:, -1].clamp(0.0, 1.0)
    return image[:, :3] if image.shape[1] >= 3 else image[:, :1].expand(-1, 3, -1, -1)


@torch.no_grad()
def traversal_grid(policy, normalized_obs: Mapping[str, torch.Tensor], values: Sequence[float] = (-2, -1, 0, 1, 2), max_dims: int = 16) -> np.ndarray:
    """Rows: latent coordinates 0..min(D, max_dims)-1 of sample 0; columns: the real image, then the
    decoded mean image with that coordinate moved by each of `values` (in SDs: the latent is in
    normalized units, so 1 is one standard deviation of the training actions for BVAE, of the prior
    for VAE+NN). Returns a uint8 HWC grid (see `tile_grid`)."""
    vae = policy.vae
    packed = vae.pack({k: v[:1] for k, v in normalized_obs.items()})
    mu = vae.encode(packed)[:, : vae.latent_dim]
    rows = min(vae.latent_dim, max_dims)
    offsets = torch.tensor(values, dtype=mu.dtype, device=mu.device)
    latents = mu.repeat(rows * len(values), 1)
    latents[torch.arange(rows * len(values)), torch.arange(rows).repeat_interleave(len(values))] += offsets.repeat(rows)
    decoded = vae.unpack(vae.decode(latents)[0])
    images = display_image(policy, decoded).reshape(rows, len(values), 3, *decoded[vae.rgb_keys[0]].shape[-2:])
    real = display_image(policy, normalized_obs)[:1].expand(rows, -1, -1, -1)
    return tile_grid(torch.cat([real[:, None], images], dim=1))


def tile_grid(tiles: torch.Tensor, pad: int = 2) -> np.ndarray:
    """`(rows, cols, 3, H, W)` in [0, 1] -> uint8 `(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`, white gaps."""
    rows, cols, _, h, w = tiles.shape
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, y : y + h, x : x + w] = tiles[r, c].cpu()
    return (rearrange(grid, "c h w -> h w c").clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_png(array: np.ndarray, path: str | Path) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, array)
    return path


__all__ = ["display_image", "tile_grid", "traversal_grid", "write_png"]
