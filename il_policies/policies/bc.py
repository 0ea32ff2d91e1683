"""Behavior cloning: regress the action chunk from the observation history.

    a_{t:t+H} = f(o_{t-T+1:t}),    L = || f(o) - a ||^2   (normalized units, padded steps masked)

`encoder: conv` (default): each camera through the shared image encoder (`vision`: backbone,
pooling, linear; `il_policies.nn.vision`), low-dim observations as they are, then an MLP. No image
augmentation by default (`augment.kind=crop|shift` for cameras whose scene moves in the frame).
Chunks (`horizon`) and observation history (`n_obs_steps`), executed through the action queue or
temporal ensembling, as every policy. `encoder: conv_vae`: f is BVAE's encoder E itself (the conv VAE family of
`il_policies.nn.conv_vae`, its output the action chunk instead of a posterior): the writeup's "NN"
baseline, `conf/policy/bc_conv_vae.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange

from il_policies.nn import ObservationEncoder, mlp
from il_policies.nn.conv_vae import ORIGINAL_CHANNELS
from il_policies.nn.losses import masked_mean
from il_policies.nn.observation_vae import StackedObservationEncoder
from il_policies.policies.base import Policy
from il_policies.policies.config import AugmentConfig, PolicyConfig, VisionConfig
from il_policies.policies.registry import register_policy

ENCODERS = ("conv", "conv_vae")


@dataclass
class BCConfig(PolicyConfig):
    name: str = "bc"
    encoder: str = "conv"  # conv | conv_vae
    hidden_dims: tuple[int, ...] = (256, 256)  # the MLP head (conv_vae: the low-dim-only MLP)
    dropout: float = 0.0  # in the MLP head (conv)
    vision: VisionConfig = field(default_factory=VisionConfig)  # each camera's encoder (conv)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    conv_channels: tuple[int, ...] = ORIGINAL_CHANNELS  # conv_vae: the encoder's 4 conv widths
    hidden_dim: int = 28  # conv_vae: the MLP width between conv features and output
    norm: str = "group"  # conv_vae: batch | group | none

    def __post_init__(self):
        super().__post_init__()
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown BC encoder {self.encoder!r}: use one of {ENCODERS}")
        if self.vision.weights:
            self.use_imagenet_statistics()


@register_policy("bc")
class BCPolicy(Policy):
    config_class = BCConfig

    def __init__(self, config: BCConfig, shape_meta):
        super().__init__(config, shape_meta)
        out_dim = config.horizon * self.action_dim
        if config.encoder == "conv_vae":
            self.obs_encoder = StackedObservationEncoder(
                self.network_obs_meta, config.n_obs_steps, out_dim, config.conv_channels, config.hidden_dim, config.norm, config.hidden_dims
            )
        else:
            self.obs_encoder = ObservationEncoder(self.network_obs_meta, config.vision)
            self.head = mlp(self.obs_encoder.out_dim * config.n_obs_steps, config.hidden_dims, out_dim, dropout=config.dropout)

    def _predict_normalized(self, normalized_obs) -> torch.Tensor:
        if self.config.encoder == "conv_vae":
            flat = self.obs_encoder.encode(self.obs_encoder.pack(normalized_obs))
        else:
            flat = self.head(rearrange(self.obs_encoder(normalized_obs), "b t d -> b (t d)"))
        return rearrange(flat, "b (h a) -> b h a", a=self.action_dim)

    def compute_loss(self, batch):
        predicted = self._predict_normalized(self.normalize_obs(batch["obs"]))
        target = self.normalizer.normalize("action", batch["action"])
        loss = masked_mean((predicted - target).square(), batch.get("action_is_pad"))
        return loss, {"action_mse": loss.item()}

    def _predict_action_chunk(self, obs, generator=None):
        return self.normalizer.unnormalize("action", self._predict_normalized(self.normalize_obs(obs)))
