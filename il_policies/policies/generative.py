"""The config BVAE and VAE+NN share: the observation VAE's networks (`il_policies.nn.observation_vae`,
the conv family of `il_policies.nn.conv_vae`), the scale parameterization, the sampling noise scale
and the KL schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from il_policies.nn.conv_vae import ORIGINAL_CHANNELS, ORIGINAL_HIDDEN
from il_policies.nn.vae import KLSchedule
from il_policies.policies.config import PolicyConfig


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
    # KL(q(z|o) || N(0, I)) keeps the encoder's scale well-posed; its mu^2 part pulls the predicted action
    # toward the mean action (by a factor ~1 / (1 + beta * latent_dim / 2)), so beta stays small.
    kl_schedule: KLSchedule = field(default_factory=lambda: KLSchedule("linear", weight=1e-3, warmup_steps=1000))

    def __post_init__(self):
        super().__post_init__()
        if self.scale not in ("logvar", "softplus", "raw"):
            raise ValueError(f"scale must be logvar, softplus or raw, got {self.scale!r}")

    def vae_options(self) -> dict:
        """The `ObservationVAE` architecture options."""
        return dict(conv_channels=self.conv_channels, hidden_dim=self.hidden_dim, norm=self.norm, mlp_hidden_dims=self.mlp_hidden_dims,
                    upsample_sizes=self.upsample_sizes, output_activation=self.output_activation)

