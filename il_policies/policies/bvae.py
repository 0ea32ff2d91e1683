"""BVAE: a bidirectional VAE whose latent space is the action space (spec: shared/specs/bvae.md).

One encoder E and one decoder D, shared by two passes, everything in normalized units:

    Network 1 (o -> a -> o):  (mu_a, s_a) = E(o),  z = mu_a + eps * s_a * noise_scale,
                              (mu_o, s_o) = D(z),  o_hat = mu_o + eps * s_o * noise_scale
    Network 2 (a -> o -> a):  (mu_o', s_o') = D(a),  o_tilde = mu_o' + eps * s_o' * noise_scale,
                              (mu_a', s_a') = E(o_tilde),  a_tilde = mu_a' + eps * s_a' * noise_scale

    action_supervised = || mu_a - a ||^2          (E only; the policy's metric)
    obs_supervised    = || mu_o' - o ||^2         (D only)
    obs_recon         = || o_hat - o ||^2         (E and D)
    action_recon      = || a_tilde - a ||^2       (D and E)
    kl                = KL(N(mu_a, s_a^2) || N(0, I)), summed over latent dims, mean over the batch

    loss = sum_i w_i * term_i + beta(step) * kl,   beta from `kl_schedule` (KLSchedule)

MSEs are means, so each term reads in standard deviations of the training data. Action terms are
masked by `action_is_pad`; obs terms are means over the observation groups (image, low-dim; see
`il_policies.nn.observation_vae`). Chunks and history are flattened: latent = horizon * action_dim,
observations = n_obs_steps frames stacked. Inference: `action = mu_a(E(o))`, no sampling.

A term whose weight is 0 is skipped in training steps and computed without a graph in eval mode, so
validation reports every term; with only `action_supervised` weighted, E learns as behavior cloning
with BVAE's encoder would (the baseline itself is the registry's `bc` with `encoder: conv_vae`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange

from il_policies.nn.conv_vae import running_stats_frozen
from il_policies.nn.losses import masked_mean
from il_policies.nn.observation_vae import ObservationVAE, obs_mse, sample_pack
from il_policies.nn.vae import gaussian_from_output, gaussian_kl, reparameterize
from il_policies.policies.base import Policy
from il_policies.policies.config import loss_weights_of
from il_policies.policies.generative import GenerativeConfig
from il_policies.policies.registry import register_policy

TERMS = ("action_supervised", "obs_supervised", "obs_recon", "action_recon")


@dataclass
class BVAEConfig(GenerativeConfig):
    name: str = "bvae"
    loss_weights: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 1.0))  # a term left out weighs 0

    def __post_init__(self):
        super().__post_init__()
        self.loss_weights = loss_weights_of(self.loss_weights, TERMS)


@register_policy("bvae")
class BVAEPolicy(Policy):
    config_class = BVAEConfig

    def __init__(self, config: BVAEConfig, shape_meta):
        super().__init__(config, shape_meta)
        self.latent_dim = config.horizon * self.action_dim
        self.vae = ObservationVAE(self.network_obs_meta, config.n_obs_steps, self.latent_dim, **config.vae_options())

    # ---- the two passes -----------------------------------------------------------------------
    def _grad(self, *terms: str):
        """Build a term's graph only when it is trained (and we are not under no_grad)."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and self._trained(*terms))

    def _trained(self, *terms: str) -> bool:
        return any(self.config.loss_weights[t] for t in terms)

    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        cfg, vae = self.config, self.vae
        o = vae.pack(self.normalize_obs(batch["obs"]))
        a = self.normalizer.normalize("action", batch["action"])  # (B, H, A)
        is_pad = batch.get("action_is_pad")
        a_flat = rearrange(a, "b h a -> b (h a)")

        def action_mse(prediction):
            return masked_mean((rearrange(prediction, "b (h a) -> b h a", a=self.action_dim) - a).square(), is_pad)

        # Network 1: o -> a -> o
        mu_a, s_a, logvar_a = gaussian_from_output(vae.encode(o), cfg.scale)
        terms = {"action_supervised": action_mse(mu_a), "kl": gaussian_kl(mu_a, logvar_a).mean()}
        every = not self.training  # training steps skip the terms with weight 0; validation reports all
        # BatchNorm's running statistics (eval mode) come only from the inputs each network sees at
        # inference: E's from real observations, D's from actions (what decode_action feeds it).
        if every or self._trained("obs_recon"):
            with self._grad("obs_recon"), running_stats_frozen(vae.decoder):
                mu_o, raw_o = vae.decode(reparameterize(mu_a, s_a, cfg.noise_scale))
                o_hat = sample_pack(mu_o, raw_o, cfg.scale, cfg.noise_scale)
                terms["obs_recon"] = obs_mse(o_hat, o)
        # Network 2: a -> o -> a
        if every or self._trained("obs_supervised", "action_recon"):
            with self._grad("obs_supervised", "action_recon"):
                mu_o2, raw_o2 = vae.decode(a_flat)
                terms["obs_supervised"] = obs_mse(mu_o2, o)
            with self._grad("action_recon"), running_stats_frozen(vae.encoder):
                o_tilde = sample_pack(mu_o2, raw_o2, cfg.scale, cfg.noise_scale)
                mu_a2, s_a2, _ = gaussian_from_output(vae.encode(o_tilde), cfg.scale)
                a_tilde = reparameterize(mu_a2, s_a2, cfg.noise_scale)
                terms["action_recon"] = action_mse(a_tilde)
        return terms

    def compute_loss(self, batch):
        terms = self.loss_terms(batch)
        beta = self.config.kl_schedule(self.training_step)
        weighted = [w * terms[t] for t, w in self.config.loss_weights.items() if w]
        if beta:
            weighted.append(beta * terms["kl"])
        loss = torch.stack(weighted).sum() if weighted else terms["action_supervised"] * 0.0
        metrics = {name: value.item() for name, value in terms.items()}
        return loss, {**metrics, "kl_weight": float(beta)}

    # ---- inference ----------------------------------------------------------------------------
    def _mu(self, obs) -> torch.Tensor:
        return self.vae.encode(self.vae.pack(self.normalize_obs(obs)))[:, : self.latent_dim]

    def _predict_action_chunk(self, obs, generator=None):
        mu = rearrange(self._mu(obs), "b (h a) -> b h a", a=self.action_dim)
        return self.normalizer.unnormalize("action", mu)

    # ---- generative ---------------------------------------------------------------------------
    def decoder_latent(self, batch) -> torch.Tensor:
        """What D decodes for a sample: its normalized action chunk, flattened (`generative_checks`)."""
        return rearrange(self.normalizer.normalize("action", batch["action"]), "b h a -> b (h a)")

    @torch.no_grad()
    def decode_action(self, action: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw action chunk `(B, horizon, A)` -> the observation D imagines, `{key: (B, T, *shape)}`
        raw units (images in [0, 1]): the mean of D(a)."""
        latent = rearrange(self.normalizer.normalize("action", action), "b h a -> b (h a)")
        decoded = self.vae.unpack(self.vae.decode(latent)[0])
        out = {key: self.normalizer.unnormalize(key, value) for key, value in decoded.items()}
        return {k: v.clamp(0.0, 1.0) if k in self.vae.rgb_keys else v for k, v in out.items()}

    @torch.no_grad()
    def visualize(self, batch, out_dir) -> list:
        """`latent_traversal.png` (rows: action coordinates -2..+2 SD around a real sample's latent)
        and `action_to_obs.png` (top: real images; bottom: D(true action); below: each column's
        action, its first step in raw units). Image policies only."""
        from il_policies.visualization import display_image, tile_grid, traversal_grid, write_png

        if not self.vae.rgb_keys:
            return []
        obs = self.normalize_obs(batch["obs"])
        paths = [write_png(traversal_grid(self, obs), Path(out_dir) / "latent_traversal.png")]
        n = min(8, batch["action"].shape[0])
        decoded = self.decode_action(batch["action"][:n])
        imagined = display_image(self, self.normalizer.normalize_obs(decoded))
        pair = torch.stack([display_image(self, {k: v[:n] for k, v in obs.items()}), imagined])
        columns = [f"#{i + 1}" for i in range(n)]
        notes = [f"#{i + 1}: a = [{', '.join(f'{x:+.2f}' for x in batch['action'][i, 0].tolist())}]" for i in range(n)]
        grid = tile_grid(pair, row_labels=["real", "D(a)"], col_labels=columns, notes=notes)
        paths.append(write_png(grid, Path(out_dir) / "action_to_obs.png"))
        return paths
