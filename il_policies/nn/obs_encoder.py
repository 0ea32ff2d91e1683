"""Turns a dict of observations into one feature vector per timestep."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import rearrange
from torch import nn

from il_policies.nn.vision import ImageEncoder
from il_policies.policies.config import VisionConfig


class ObservationEncoder(nn.Module):
    """Each camera through an `ImageEncoder` (one per camera, or one shared), low-dim keys
    concatenated as they are.

    Input: `{key: (B, T, *shape)}` normalized; output `(B, T, out_dim)`. Keys are processed in sorted
    order so that the feature layout does not depend on dict order.
    """

    def __init__(self, obs_meta: Mapping[str, Mapping], vision: VisionConfig):
        super().__init__()
        self.rgb_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "rgb")
        self.low_dim_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "low_dim")
        self.shared = vision.shared and len(self.rgb_keys) > 1
        if self.shared:
            shapes = {tuple(obs_meta[k]["shape"]) for k in self.rgb_keys}
            if len(shapes) != 1:
                raise ValueError(f"vision.shared needs every camera at one shape, got {sorted(shapes)}")
            self.cameras = nn.ModuleDict({"shared": ImageEncoder(shapes.pop(), vision)})
        else:
            self.cameras = nn.ModuleDict({_name(k): ImageEncoder(obs_meta[k]["shape"], vision) for k in self.rgb_keys})
        low_dim = sum(int(torch.Size(obs_meta[k]["shape"]).numel()) for k in self.low_dim_keys)
        self.out_dim = low_dim + vision.feature_dim * len(self.rgb_keys)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = []
        batch = next(iter(obs.values())).shape[0]
        if self.shared:  # every camera in one batch through the one encoder
            images = torch.stack([obs[k] for k in self.rgb_keys], dim=1)
            encoded = self.cameras["shared"](rearrange(images, "b n t c h w -> (b n t) c h w"))
            features.append(rearrange(encoded, "(b n t) d -> b t (n d)", b=batch, n=len(self.rgb_keys)))
        else:
            for key in self.rgb_keys:
                encoded = self.cameras[_name(key)](rearrange(obs[key], "b t c h w -> (b t) c h w"))
                features.append(rearrange(encoded, "(b t) d -> b t d", b=batch))
        for key in self.low_dim_keys:
            features.append(rearrange(obs[key], "b t ... -> b t (...)"))
        return torch.cat(features, dim=-1)


def _name(key: str) -> str:
    return key.replace(".", "__")  # nn.ModuleDict keys may not contain dots
