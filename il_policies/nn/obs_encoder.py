"""Turns a dict of observations into one feature vector per timestep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import rearrange
from torch import nn

from il_policies.nn.conv import ConvEncoder


class ObservationEncoder(nn.Module):
    """One ConvEncoder per camera, low-dim keys concatenated as they are.

    Input: `{key: (B, T, *shape)}` normalized; output `(B, T, out_dim)`. Keys are processed in sorted
    order so that the feature layout does not depend on dict order.
    """

    def __init__(self, obs_meta: Mapping[str, Mapping], image_feature_dim: int = 64, conv_channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        self.rgb_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "rgb")
        self.low_dim_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "low_dim")
        self.cameras = nn.ModuleDict(
            {
                key.replace(".", "__"): ConvEncoder(obs_meta[key]["shape"][0], image_feature_dim, conv_channels)
                for key in self.rgb_keys
            }
        )
        low_dim = sum(int(torch.Size(obs_meta[k]["shape"]).numel()) for k in self.low_dim_keys)
        self.out_dim = low_dim + image_feature_dim * len(self.rgb_keys)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = []
        for key in self.rgb_keys:
            image = obs[key]
            batch = image.shape[0]
            encoded = self.cameras[key.replace(".", "__")](rearrange(image, "b t c h w -> (b t) c h w"))
            features.append(rearrange(encoded, "(b t) d -> b t d", b=batch))
        for key in self.low_dim_keys:
            features.append(rearrange(obs[key], "b t ... -> b t (...)"))
        return torch.cat(features, dim=-1)
