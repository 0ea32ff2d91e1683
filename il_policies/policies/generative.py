"""What BVAE and VAE+NN share (and BC with their encoder): the observation VAE networks, their options,
and generative pictures.

- `GenerativeConfig`: the encoder/decoder options (the `il_policies.nn.conv_vae` family), the scale
  parameterization, the sampling noise scale and the KL schedule.
- `StackedObservationEncoder`: E alone (what `policy=bc_conv_vae` regresses actions with).
- `ObservationVAE`: one encoder E and one decoder D for the policy's observations, in normalized
  units. Observations are packed into at most two groups: `image` (every camera and every frame of
  the history stacked along channels, `(B, sum T*C, H, W)`) and `low_dim` (every low-dim key and
  frame flattened, `(B, L)`). With images, the low-dim group goes into E's MLP beside the image
  features and D reconstructs it with a linear head beside the image, so the decoder outputs a
  whole observation (that is what Network 2 feeds back into E). Without images, E and D are MLPs.
  `obs_mse` is the mean over the groups of each group's MSE (in standard deviations).
- `traversal_grid`: vary one latent coordinate at a time around a real sample's latent and decode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from il_policies.nn.conv_vae import (
    ORIGINAL_CHANNELS,
    ORIGINAL_HIDDEN,
    ConvImageDecoder,
    ConvImageEncoder,
    MLPDecoder,
    MLPEncoder,
)
from il_policies.nn.vae import KLSchedule, scale_from_raw
from il_policies.policies.base import PolicyConfig

ObsPack = dict  # {"image": (B, C', H, W), "low_dim": (B, L)}, either may be absent


@dataclass
class GenerativeConfig(PolicyConfig):
    conv_channels: tuple[int, ...] = ORIGINAL_CHANNELS  # the 4 conv widths of the image family
    hidden_dim: int = ORIGINAL_HIDDEN  # width of the MLP between conv features and latent
    norm: str = "group"  # batch (the original) | group | none
    upsample_sizes: tuple | None = None  # decoder sizes after each block; None: geometric to the image size
    output_activation: bool = False  # the original ends the decoder with BatchNorm + LeakyReLU
    mlp_hidden_dims: tuple[int, ...] = (256, 256)  # low-dim E and D
    scale: str = "softplus"  # logvar | softplus | raw (the original: the raw output is the std)
    noise_scale: float = 1.0  # z = mu + eps * std * noise_scale (the original: 0.5)
    kl_schedule: dict = field(default_factory=lambda: {"kind": "linear", "weight": 1e-3, "warmup_steps": 1000})

    def __post_init__(self):
        super().__post_init__()
        if self.scale not in ("logvar", "softplus", "raw"):
            raise ValueError(f"scale must be logvar, softplus or raw, got {self.scale!r}")
        self.kl_schedule = dict(self.kl_schedule)
        KLSchedule(**self.kl_schedule)  # refuse a bad schedule now, not at the first step


class StackedObservationEncoder(nn.Module):
    """E of the conv VAE family over a policy's observations: pack -> `(B, out_dim)`."""

    def __init__(self, obs_meta: Mapping[str, Mapping], n_obs_steps: int, out_dim: int, conv_channels: Sequence[int],
                 hidden_dim: int, norm: str, mlp_hidden_dims: Sequence[int]):
        super().__init__()
        self.rgb_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "rgb")
        self.low_dim_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "low_dim")
        self.obs_meta = {k: {"shape": tuple(obs_meta[k]["shape"]), "kind": obs_meta[k]["kind"]} for k in obs_meta}
        self.n_obs_steps = n_obs_steps
        self.low_dim = n_obs_steps * sum(int(np.prod(obs_meta[k]["shape"])) for k in self.low_dim_keys)
        self.arch = dict(channels=tuple(conv_channels), hidden_dim=hidden_dim, norm=norm)
        if self.rgb_keys:
            sizes = {tuple(obs_meta[k]["shape"][1:]) for k in self.rgb_keys}
            if len(sizes) != 1:
                raise ValueError(f"the conv VAE stacks cameras along channels: they need one image size, got {sorted(sizes)}")
            (self.image_size,) = sizes
            self.channels = n_obs_steps * sum(int(obs_meta[k]["shape"][0]) for k in self.rgb_keys)
            self.encoder = ConvImageEncoder(self.channels, self.image_size, out_dim, self.low_dim, **self.arch)
        else:
            self.encoder = MLPEncoder(self.low_dim, out_dim, mlp_hidden_dims)

    # ---- packing ------------------------------------------------------------------------------
    def pack(self, obs: Mapping[str, torch.Tensor]) -> ObsPack:
        """Normalized `{key: (B, T, *shape)}` -> the E input / D target groups."""
        packed = {}
        if self.rgb_keys:
            images = [obs[k].flatten(1, 2) for k in self.rgb_keys]  # (B, T, C, H, W) -> (B, T*C, H, W), frames stacked
            packed["image"] = images[0] if len(images) == 1 else torch.cat(images, dim=1)
        if self.low_dim_keys:
            lows = [obs[k].flatten(1) for k in self.low_dim_keys]  # (B, T, ...) -> (B, T*...)
            packed["low_dim"] = lows[0] if len(lows) == 1 else torch.cat(lows, dim=-1)
        return packed

    def unpack(self, packed: ObsPack) -> dict[str, torch.Tensor]:
        """Inverse of `pack`: `{key: (B, T, *shape)}`."""
        out, t = {}, self.n_obs_steps
        for group, keys in (("image", self.rgb_keys), ("low_dim", self.low_dim_keys)):
            start = 0
            for key in keys:
                shape = self.obs_meta[key]["shape"]
                width = t * (shape[0] if group == "image" else int(np.prod(shape)))
                part = packed[group][:, start : start + width]
                out[key] = part.reshape(part.shape[0], t, *shape)
                start += width
        return out

    # ---- networks -----------------------------------------------------------------------------
    def encode(self, packed: ObsPack) -> torch.Tensor:
        if self.rgb_keys:
            return self.encoder(packed["image"], packed.get("low_dim"))
        return self.encoder(packed["low_dim"])

    def encode_observation(self, obs: Mapping[str, torch.Tensor], normalizer) -> torch.Tensor:
        """`encode` for raw observations `{key: (B, T, *shape)}`."""
        return self.encode(self.pack(normalizer.normalize_obs(obs)))


class ObservationVAE(StackedObservationEncoder):
    """E: observation pack -> `2 * latent_dim`; D: latent -> (mean pack, raw scale pack)."""

    def __init__(self, config: GenerativeConfig, obs_meta: Mapping[str, Mapping], n_obs_steps: int, latent_dim: int):
        super().__init__(obs_meta, n_obs_steps, 2 * latent_dim, config.conv_channels, config.hidden_dim, config.norm,
                         config.mlp_hidden_dims)
        self.latent_dim = latent_dim
        if self.rgb_keys:
            self.decoder = ConvImageDecoder(
                self.channels, self.image_size, latent_dim, self.low_dim, **self.arch,
                upsample_sizes=config.upsample_sizes, output_activation=config.output_activation,
            )
        else:
            self.decoder = MLPDecoder(latent_dim, self.low_dim, config.mlp_hidden_dims)

    def decode(self, latent: torch.Tensor) -> tuple[ObsPack, ObsPack]:
        """-> (mean pack, raw scale pack)."""
        if self.rgb_keys:
            image, low = self.decoder(latent)
            mean, raw = {}, {}
            mean["image"], raw["image"] = image.chunk(2, dim=1)
            if low is not None:
                mean["low_dim"], raw["low_dim"] = low.chunk(2, dim=-1)
            return mean, raw
        mean, raw = self.decoder(latent).chunk(2, dim=-1)
        return {"low_dim": mean}, {"low_dim": raw}


def posterior(out: torch.Tensor, parameterization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E's output `(B, 2D)` -> (mu, std, logvar). With `raw` the std may be negative; N(mu, raw^2)
    is the same Gaussian, so its KL uses log(raw^2) and stays finite (it is only logged there)."""
    mu, raw = out.chunk(2, dim=-1)
    std, logvar = scale_from_raw(raw, parameterization)
    if parameterization == "raw":
        logvar = torch.log(raw.square().clamp_min(1e-12))
    return mu, std, logvar


def std_from_raw(raw: torch.Tensor, parameterization: str) -> torch.Tensor:
    """The std of `scale_from_raw` without its logvar (an image-sized log saved per decode)."""
    if parameterization == "softplus":
        return F.softplus(raw) + 1e-4
    if parameterization == "logvar":
        return torch.exp(0.5 * raw.clamp(-20.0, 10.0))
    return scale_from_raw(raw, parameterization)[0]


def pack_std(raw: ObsPack, parameterization: str) -> ObsPack:
    return {group: std_from_raw(value, parameterization) for group, value in raw.items()}


def sample_pack(mean: ObsPack, std: ObsPack, noise_scale: float) -> ObsPack:
    """Reparameterized sample of every group: mean + eps * std * noise_scale."""
    return {group: mean[group] + std[group] * torch.randn_like(std[group]) * noise_scale for group in mean}


def obs_mse(prediction: ObsPack, target: ObsPack) -> torch.Tensor:
    """Mean over the observation groups of each group's MSE (normalized units)."""
    terms = [(prediction[group] - target[group]).square().mean() for group in target]
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


# ---- pictures ---------------------------------------------------------------------------------
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
