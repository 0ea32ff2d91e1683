"""Pictures of what a generative policy learned: latent traversal grids and tiled image pairs, as
labelled PNGs (which coordinate, how many SDs, which action)."""

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


def latent_labels(policy, n: int) -> list[str]:
    """Names of the first `n` latent coordinates: BVAE's are the action chunk's (step t+h, dim i)."""
    if not hasattr(policy, "decode_action"):  # VAE+NN: a latent of its own
        return [f"z[{j}]" for j in range(n)]
    a = policy.action_dim
    return [f"a[{j % a}]" if policy.config.horizon == 1 else f"a[{j % a}] t+{j // a}" for j in range(n)]


@torch.no_grad()
def traversal_grid(policy, normalized_obs: Mapping[str, torch.Tensor], values: Sequence[float] = (-2, -1, 0, 1, 2), max_dims: int = 16) -> np.ndarray:
    """Rows: latent coordinates 0..min(D, max_dims)-1 of sample 0; columns: the real image, then the
    decoded mean image with that coordinate moved by each of `values` (in SDs: the latent is in
    normalized units, so 1 is one standard deviation of the training actions for BVAE, of the prior
    for VAE+NN). Returns a labelled uint8 HWC grid (see `tile_grid`)."""
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
    columns = ["real", *(f"{v:+g} SD" for v in values)]
    return tile_grid(torch.cat([real[:, None], images], dim=1), row_labels=latent_labels(policy, rows), col_labels=columns)


def tile_grid(tiles: torch.Tensor, pad: int = 2, row_labels: Sequence[str] = (), col_labels: Sequence[str] = (),
              notes: Sequence[str] = ()) -> np.ndarray:
    """`(rows, cols, 3, H, W)` in [0, 1] -> uint8 HWC image: the tiles on white with `pad` gaps, a
    label left of each row and above each column when given, and lines of `notes` below."""
    rows, cols, _, h, w = tiles.shape
    grid = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[:, y : y + h, x : x + w] = tiles[r, c].cpu()
    array = (rearrange(grid, "c h w -> h w c").clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if not (row_labels or col_labels or notes):
        return array
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line = font.getbbox("Ag[0]")[3] + 3
    left = max((int(font.getlength(text)) for text in row_labels), default=-pad) + pad + 4
    top = line if col_labels else 0
    width = max(left + array.shape[1], *(int(font.getlength(text)) + 2 * pad for text in notes)) if notes else left + array.shape[1]
    canvas = Image.new("RGB", (width, top + array.shape[0] + line * len(notes)), "white")
    canvas.paste(Image.fromarray(array), (left, top))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels):
        draw.text((pad, top + pad + r * (h + pad) + (h - line) // 2), text, fill="black", font=font)
    for c, text in enumerate(col_labels):
        draw.text((left + pad + c * (w + pad), 1), text, fill="black", font=font)
    for i, text in enumerate(notes):
        draw.text((pad, top + array.shape[0] + i * line), text, fill="black", font=font)
    return np.asarray(canvas)


def write_png(array: np.ndarray, path: str | Path) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, array)
    return path


__all__ = ["display_image", "latent_labels", "tile_grid", "traversal_grid", "write_png"]
