"""VAE+NN: the writeup's baseline. A plain VAE on observations plus a linear head from its mean
latent to the action, with BVAE's encoder/decoder classes (`il_policies.nn.observation_vae`).

    (mu, s) = E(o),  z = mu + eps * s * noise_scale,  (mu_o, s_o) = D(z),  o_hat = mu_o + eps * s_o * noise_scale
    obs_recon         = || o_hat - o ||^2
    kl                = KL(N(mu, s^2) || N(0, I))   (sum over latent dims, mean over the batch)
    action_supervised = || W mu + b - a ||^2        (W: Linear(D, H*A); D = H*A by default)

    loss = obs_recon + beta(step) * kl + action_weight * action_supervised

Joint by default: the head's loss also trains E. `two_stage: true` trains the head on `mu.detach()`,
i.e. a VAE and a linear read-out trained side by side with no gradient from the action into the
VAE (the writeup's "separate model" variant, without a step-dependent freeze). Inference:
`head(mu(E(o)))`, no sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from il_policies.nn.losses import masked_mean
from il_policies.nn.observation_vae import ObservationVAE, obs_mse, sample_pack
from il_policies.nn.vae import gaussian_from_output, gaussian_kl, reparameterize
from il_policies.policies.base import Policy
from il_policies.policies.generative import GenerativeConfig
from il_policies.policies.registry import register_policy


@dataclass
class VAENNConfig(GenerativeConfig):
    name: str = "vae_nn"
    latent_dim: int | None = None  # None: horizon * action_dim, as BVAE (the head is then Linear(A, A))
    action_weight: float = 1.0
    two_stage: bool = False  # true: the head learns from mu.detach(); E and D only from the VAE loss


@register_policy("vae_nn")
class VAENNPolicy(Policy):
    config_class = VAENNConfig

    def __init__(self, config: VAENNConfig, shape_meta):
        super().__init__(config, shape_meta)
        out_dim = config.horizon * self.action_dim
        self.latent_dim = config.latent_dim or out_dim
        self.vae = ObservationVAE(self.network_obs_meta, config.n_obs_steps, self.latent_dim, **config.vae_options())
        self.head = nn.Linear(self.latent_dim, out_dim)

    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        cfg, vae = self.config, self.vae
        o = vae.pack(self.normalize_obs(batch["obs"]))
        a = self.normalizer.normalize("action", batch["action"])
        mu, s, logvar = gaussian_from_output(vae.encode(o), cfg.scale)
        mu_o, raw_o = vae.decode(reparameterize(mu, s, cfg.noise_scale))
        o_hat = sample_pack(mu_o, raw_o, cfg.scale, cfg.noise_scale)
        predicted = rearrange(self.head(mu.detach() if cfg.two_stage else mu), "b (h a) -> b h a", a=self.action_dim)
        return {
            "obs_recon": obs_mse(o_hat, o),
            "kl": gaussian_kl(mu, logvar).mean(),
            "action_supervised": masked_mean((predicted - a).square(), batch.get("action_is_pad")),
        }

    def compute_loss(self, batch):
        terms = self.loss_terms(batch)
        beta = self.config.kl_schedule(self.training_step)
        loss = terms["obs_recon"] + self.config.action_weight * terms["action_supervised"]
        if beta:
            loss = loss + beta * terms["kl"]
        return loss, {**{name: value.item() for name, value in terms.items()}, "kl_weight": float(beta)}

    def decoder_latent(self, batch) -> torch.Tensor:
        """What D decodes for a sample: E's mean latent of its observation (`generative_checks`)."""
        return self.vae.encode(self.vae.pack(self.normalize_obs(batch["obs"])))[:, : self.latent_dim]

    def _predict_action_chunk(self, obs, generator=None):
        mu = self.decoder_latent({"obs": obs})
        return self.normalizer.unnormalize("action", rearrange(self.head(mu), "b (h a) -> b h a", a=self.action_dim))

    @torch.no_grad()
    def visualize(self, batch, out_dir) -> list:
        """`latent_traversal.png`: each VAE latent coordinate moved -2..+2 prior SDs (image policies)."""
        from il_policies.visualization import traversal_grid, write_png

        if not self.vae.rgb_keys:
            return []
        obs = self.normalize_obs(batch["obs"])
        return [write_png(traversal_grid(self, obs), Path(out_dir) / "latent_traversal.png")]
