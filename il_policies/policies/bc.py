"""Behavior cloning: regress the action chunk from the observation history.

    a_{t:t+H} = f(o_{t-T+1:t}),    L = || f(o) - a ||^2   (normalized units, padded steps masked)

Images go through the shared ConvEncoder; low-dim observations are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from il_policies.nn import ObservationEncoder, mlp
from il_policies.nn.losses import masked_mean
from il_policies.policies.base import Policy, PolicyConfig
from il_policies.policies.registry import register_policy


@dataclass
class BCConfig(PolicyConfig):
    hidden_dims: tuple[int, ...] = (256, 256)
    dropout: float = 0.0
    image_feature_dim: int = 64
    conv_channels: tuple[int, ...] = (32, 64, 128)


@register_policy("bc")
class BCPolicy(Policy):
    config_class = BCConfig

    def __init__(self, config: BCConfig, shape_meta):
        super().__init__(config, shape_meta)
        self.obs_encoder = ObservationEncoder(shape_meta["obs"], config.image_feature_dim, config.conv_channels)
        self.head = mlp(
            self.obs_encoder.out_dim * config.n_obs_steps,
            config.hidden_dims,
            config.horizon * self.action_dim,
            dropout=config.dropout,
        )

    def _predict_normalized(self, normalized_obs) -> torch.Tensor:
        features = rearrange(self.obs_encoder(normalized_obs), "b t d -> b (t d)")
        return rearrange(self.head(features), "b (h a) -> b h a", a=self.action_dim)

    def compute_loss(self, batch):
        predicted = self._predict_normalized(self.normalizer.normalize_obs(batch["obs"]))
        target = self.normalizer.normalize("action", batch["action"])
        loss = masked_mean((predicted - target).square(), batch.get("action_is_pad"))
        return loss, {"action_mse": loss.item()}

    def _predict_action_chunk(self, obs):
        normalized = self._predict_normalized(self.normalizer.normalize_obs(obs))
        return self.normalizer.unnormalize("action", normalized)
