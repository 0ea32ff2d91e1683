"""The observation VAE of BVAE and VAE+NN (and the encoder alone, for BC with their encoder).

- `StackedObservationEncoder`: E over a policy's observations. Observations are packed into at most
  two groups: `image` (every camera and every frame of the history stacked along channels,
  `(B, sum T*C, H, W)`) and `low_dim` (every low-dim key and frame flattened, `(B, L)`). With images
  the low-dim group goes into E's MLP beside the image features; without images E is an MLP.
- `ObservationVAE`: E and a decoder D that outputs a whole observation (mean and raw scale per
  group): with images, a linear head of D reconstructs the low-dim group beside the image.
- `obs_mse`: the mean over the groups of each group's MSE (in standard deviations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from il_policies.nn.conv_vae import ConvImageDecoder, ConvImageEncoder, MLPDecoder, MLPEncoder
from il_policies.nn.vae import reparameterize, std_from_raw

ObsPack = dict  # {"image": (B, C', H, W), "low_dim": (B, L)}, either may be absent


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


class ObservationVAE(StackedObservationEncoder):
    """E: observation pack -> `2 * latent_dim`; D: latent -> (mean pack, raw scale pack)."""

    def __init__(self, obs_meta: Mapping[str, Mapping], n_obs_steps: int, latent_dim: int, conv_channels: Sequence[int],
                 hidden_dim: int, norm: str, mlp_hidden_dims: Sequence[int], upsample_sizes=None, output_activation: bool = False):
        super().__init__(obs_meta, n_obs_steps, 2 * latent_dim, conv_channels, hidden_dim, norm, mlp_hidden_dims)
        self.latent_dim = latent_dim
        if self.rgb_keys:
            self.decoder = ConvImageDecoder(self.channels, self.image_size, latent_dim, self.low_dim, **self.arch,
                                            upsample_sizes=upsample_sizes, output_activation=output_activation)
        else:
            self.decoder = MLPDecoder(latent_dim, self.low_dim, mlp_hidden_dims)

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


def sample_pack(mean: ObsPack, raw_scale: ObsPack, parameterization: str, noise_scale: float) -> ObsPack:
    """Reparameterized sample of every group: mean + eps * std * noise_scale, std from the raw scale."""
    return {group: reparameterize(mean[group], std_from_raw(raw_scale[group], parameterization), noise_scale) for group in mean}


def obs_mse(prediction: ObsPack, target: ObsPack) -> torch.Tensor:
    """Mean over the observation groups of each group's MSE (normalized units)."""
    terms = [(prediction[group] - target[group]).square().mean() for group in target]
    return terms[0] if len(terms) == 1 else torch.stack(terms).mean()


__all__ = ["ObsPack", "ObservationVAE", "StackedObservationEncoder", "obs_mse", "sample_pack"]
