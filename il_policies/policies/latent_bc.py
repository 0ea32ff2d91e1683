"""Latent BC: behavior cloning on the filtered state of a sequence-VAE world model, trained jointly.

The world model (`il_policies.nn.world_model.SequenceVAE`) on windows of T = `n_obs_steps` steps,
o_1..o_T with a_1..a_T-1 between them, everything in normalized units:

    q(z_t | o_<=t)                     the filter;   z_t = mu_t + s_t * eps
    p(z_1) = N(0, I),  p(z_t | z_t-1, a_t-1)          the prior's learned dynamics
    recon      = mean_t || D(z_t, o_1) - o_t ||^2        (o_1: the context frame of the decoder's skips)
    kl         = mean_t KL(q(z_t | o_<=t) || p(z_t | z_t-1, a_t-1))   (summed over latent dims)
    prediction = mean_t>1 KL(q(z_t | o_<=t) || p(z_t | x_t-1, a_t-1))   (q and x fixed: it trains the dynamics)
                 with x_t-1 the filtered z_t-1 with probability r(step) (teacher forcing), else the mean
                 the chain predicted for step t-1 (`SequenceVAE.predict`): latent overshooting, with r
                 decaying by `teacher_forcing` as the video-prediction report's ratio; evaluation uses
                 r = 0: open-loop prediction from the window's first state. At r = 1 it is the
                 ELBO's one-step KL seen from the dynamics' side: it fits the dynamics to the filtered
                 states at full weight while beta (small, so that z keeps what the decoder needs)
                 scales the ELBO's pull of the filter toward the dynamics.
    action     = mean_t || pi(mu_t) - a_t..t+H-1 ||^2      (the action head on every step's filtered mean)

    loss = w_recon * recon + beta(step) * kl + w_prediction * prediction + w_action * action

recon + beta * kl is the negative ELBO with a unit-variance Gaussian decoder up to the scale of beta
(MSEs are means over pixels). The world model is part of the policy, so it trains through the one
Workspace like every other policy; `loss_weights.action=0` trains the world model alone, and
`eval/imagine.py` reads the checkpoint of either. Windows that begin before an episode's start (the
sampler repeats its first frame) mask those steps out, and the episode's first step takes the
N(0, I) prior. Acting: the policy keeps the last T observations (the base class's history: the
filter's state, cleared by `reset()`), filters them and returns pi(mu_t); the chunk's entries before
the current step hold each earlier step's own first action.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from il_policies.nn.losses import masked_mean
from il_policies.nn.mlp import mlp
from il_policies.nn.vae import KLSchedule, gaussian_kl_between, reparameterize
from il_policies.nn.world_model import SequenceVAE, TeacherForcingSchedule
from il_policies.policies.base import Policy
from il_policies.policies.config import ActionWindow, PolicyConfig, loss_weights_of
from il_policies.policies.registry import register_policy

TERMS = ("recon", "prediction", "action")


@dataclass
class LatentBCConfig(PolicyConfig):
    name: str = "latent_bc"
    n_obs_steps: int = 16  # T: the window the world model trains on and the filter reads when acting
    horizon: int = 8
    n_action_steps: int = 4
    frame_size: int | None = 64  # cameras resized to frame_size x frame_size (None: as recorded)
    conv_channels: tuple[int, ...] = (16, 32, 64, 128)  # one stride-2 stage each: frame_size / 2^stages must be whole
    feature_dim: int = 256
    hidden_dim: int = 256  # the filter's GRU and the dynamics MLP
    latent_dim: int = 32
    skip_context: bool = True  # the decoder sees a context frame's feature maps (False: p(o_t | z_t) alone)
    # o_t = o_c + sigmoid(m) * change, a per-pixel gate on the decoder's change (skip_context only): ahead of
    # copying the last frame at every horizon, where the ungated change falls behind at one step (README)
    change_mask: bool = True
    scale: str = "softplus"
    head_hidden_dims: tuple[int, ...] = (256, 256)
    loss_weights: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 1.0))
    kl_schedule: KLSchedule = field(default_factory=lambda: KLSchedule("linear", weight=1e-4, warmup_steps=1000))
    teacher_forcing: TeacherForcingSchedule = field(default_factory=lambda: TeacherForcingSchedule(1.0, 0.5, 500, 1500))

    def __post_init__(self):
        super().__post_init__()
        self.loss_weights = loss_weights_of(self.loss_weights, TERMS)
        if self.frame_size is not None and self.frame_size % 2 ** len(self.conv_channels):
            raise ValueError(f"frame_size {self.frame_size} must be a multiple of 2^{len(self.conv_channels)} "
                             f"(one halving per conv_channels entry {list(self.conv_channels)})")
        if self.image_norm_per_pixel and self.frame_size is not None:
            raise ValueError("per-pixel image statistics are fitted at the recorded size: use frame_size=null with image_norm_per_pixel")

    def action_window(self) -> ActionWindow:
        """Observations t-T+1..t; actions from t-T+1 (the dynamics' inputs) to t+horizon-1 (the chunk)."""
        return ActionWindow(self.n_obs_steps, self.n_obs_steps - 1 + self.horizon, -(self.n_obs_steps - 1), self.n_action_steps)


@register_policy("latent_bc")
class LatentBCPolicy(Policy):
    config_class = LatentBCConfig

    def __init__(self, config: LatentBCConfig, shape_meta):
        super().__init__(config, shape_meta)
        meta = self.network_obs_meta
        self.rgb_keys = sorted(k for k, m in meta.items() if m["kind"] == "rgb")
        self.low_dim_keys = sorted(k for k, m in meta.items() if m["kind"] != "rgb")
        sizes = {tuple(meta[k]["shape"][1:]) for k in self.rgb_keys}
        if len(sizes) > 1 or any(h != w for h, w in sizes):
            raise ValueError(f"latent_bc stacks its cameras: they need one square size, got {sorted(sizes)}")
        recorded = next(iter(sizes))[0] if sizes else 0
        self.frame_size = config.frame_size or recorded
        if self.frame_size % 2 ** len(config.conv_channels):
            raise ValueError(f"the recorded image size {recorded} is not a multiple of 2^{len(config.conv_channels)}: set policy.frame_size")
        channels = sum(int(meta[k]["shape"][0]) for k in self.rgb_keys)
        low_dim = sum(int(meta[k]["shape"][0]) for k in self.low_dim_keys)
        self.world_model = SequenceVAE(channels, self.frame_size, low_dim, self.action_dim, config.latent_dim, config.conv_channels,
                                       config.feature_dim, config.hidden_dim, config.skip_context, config.scale,
                                       config.change_mask)
        self.head = mlp(config.latent_dim, config.head_hidden_dims, config.horizon * self.action_dim)

    # ---- observations as the world model sees them ------------------------------------------
    def frames(self, obs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`{key: (B, T, ...)}` -> normalized cameras stacked along channels at `frame_size`, `(B, T, C, S, S)`,
        and the low-dim keys concatenated, `(B, T, D)` (None where there are none)."""
        obs = self.normalize_obs(obs)
        image = low = None
        if self.rgb_keys:
            image = torch.cat([obs[k] for k in self.rgb_keys], dim=2)
            if image.shape[-1] != self.frame_size:  # area averaging commutes with the per-channel affine normalization
                b = image.shape[0]
                resized = F.interpolate(image.flatten(0, 1), size=self.frame_size, mode="area")
                image = rearrange(resized, "(b t) c h w -> b t c h w", b=b)
        if self.low_dim_keys:
            low = torch.cat([obs[k] for k in self.low_dim_keys], dim=-1)
        return image, low

    def display(self, image: torch.Tensor) -> torch.Tensor:
        """Normalized stacked frames `(..., C, S, S)` -> the first camera in [0, 1], `(..., 3, S, S)`."""
        key = self.rgb_keys[0]
        first = image[..., : int(self.network_obs_meta[key]["shape"][0]), :, :]
        return self.normalizer.unnormalize(key, first).clamp(0.0, 1.0)

    # ---- training -----------------------------------------------------------------------------
    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        cfg, model, T = self.config, self.world_model, self.config.n_obs_steps
        image, low = self.frames(batch["obs"])
        actions = self.normalizer.normalize("action", batch["action"])  # (B, T - 1 + H, A)
        if actions.shape[1] != self.window.horizon:
            raise ValueError(f"latent_bc trains on windows of {self.window.horizon} actions (n_obs_steps - 1 + horizon, from "
                             f"action_window()), got {actions.shape[1]}: build the dataset from the policy's window")
        is_pad = batch.get("action_is_pad")
        if is_pad is None:
            is_pad = torch.zeros(actions.shape[:2], dtype=torch.bool, device=actions.device)
        before_start = is_pad[:, :T]  # steps of the window before the episode's start (repeated first frame)
        features, skips = model.encode(image, low)
        mu, std, logvar = model.posterior(features)
        z = reparameterize(mu, std)

        # The prior: N(0, I) at the window's first step and at the episode's first step, else the dynamics.
        first = before_start[:, :-1, None]
        p_mu, _, p_logvar = model.transition(z[:, :-1], actions[:, : T - 1])
        zeros = torch.zeros_like(mu[:, :1])
        prior_mu = torch.cat([zeros, torch.where(first, 0.0, p_mu)], dim=1)
        prior_logvar = torch.cat([zeros, torch.where(first, 0.0, p_logvar)], dim=1)
        kl = gaussian_kl_between(mu, logvar, prior_mu, prior_logvar)  # (B, T)

        # Multi-step prediction (latent overshooting): the prior that a chain run open loop between
        # teacher-forced steps gives each step, against the filter's posterior; the filtered states
        # are fixed inputs and targets, so this term trains the dynamics alone.
        # A term with weight 0 is skipped in training steps; validation reports every term.
        real = ~before_start
        terms = {"kl": masked_mean(kl, before_start)}
        every = not self.training
        if every or cfg.loss_weights["prediction"]:
            ratio = self.teacher_forcing_ratio()
            # The chain restarts from the filtered state at the episode's first step (its prediction came from a padded step).
            restart = before_start[:, :-1] | F.pad(before_start[:, :-2], (1, 0), value=True)
            teacher = (torch.rand(restart.shape, device=z.device) < ratio) | restart
            chain_mu, chain_logvar = model.predict(z.detach(), actions[:, : T - 1], teacher)
            overshoot = gaussian_kl_between(mu[:, 1:].detach(), logvar[:, 1:].detach(), chain_mu, chain_logvar)  # (B, T - 1)
            terms["prediction"] = masked_mean(overshoot, ~(real[:, 1:] & real[:, :-1]))
        if every or cfg.loss_weights["recon"]:
            decoded_image, decoded_low = model.decode(z, *self._context(image, skips))
            recon = [masked_mean((d - x).square(), before_start) for d, x in ((decoded_image, image), (decoded_low, low)) if x is not None]
            terms["recon"] = torch.stack(recon).mean()
        if every and image is not None:  # validation: how well the open-loop chain draws steps 2..T
            predicted_image = model.decode(chain_mu, *self._context(image, skips))[0]
            error = (self.display(predicted_image) - self.display(image[:, 1:])).square().mean(dim=(2, 3, 4))
            terms["psnr_open_loop"] = masked_mean(-10.0 * torch.log10(error.clamp_min(1e-10)), ~(real[:, 1:] & real[:, :-1]))
        chunks = rearrange(self.head(mu), "b t (h a) -> b t h a", a=self.action_dim)
        targets = rearrange(actions.unfold(1, cfg.horizon, 1), "b t a h -> b t h a")  # step t's chunk a_t..t+H-1
        target_pad = is_pad.unfold(1, cfg.horizon, 1) | before_start[..., None]
        terms["action"] = masked_mean((chunks - targets).square(), target_pad)
        return terms

    @staticmethod
    def _context(image, skips):
        """The decoder's context frame: the window's first."""
        return (image[:, 0] if image is not None else None), [s[:, 0] for s in skips]

    def compute_loss(self, batch):
        terms = self.loss_terms(batch)
        beta = self.config.kl_schedule(self.training_step)
        weighted = [w * terms[t] for t, w in self.config.loss_weights.items() if w] + ([beta * terms["kl"]] if beta else [])
        loss = torch.stack(weighted).sum() if weighted else terms["kl"] * 0.0
        # (validation adds psnr_open_loop: a score, not a loss term)
        metrics = {name: value.item() for name, value in terms.items()}
        return loss, {**metrics, "kl_weight": float(beta), "teacher_forcing": self.teacher_forcing_ratio()}

    def teacher_forcing_ratio(self) -> float:
        """The schedule's ratio in training; 0 (open loop) in evaluation."""
        return float(self.config.teacher_forcing(self.training_step)) if self.training else 0.0

    # ---- acting -------------------------------------------------------------------------------
    def _predict_action_chunk(self, obs, generator=None):
        image, low = self.frames(obs)
        mu = self.world_model.posterior(self.world_model.encode(image, low)[0])[0]
        chunks = rearrange(self.head(mu), "b t (h a) -> b t h a", a=self.action_dim)
        chunk = torch.cat([chunks[:, :-1, 0], chunks[:, -1]], dim=1)  # earlier steps' own first actions, then step t's chunk
        return self.normalizer.unnormalize("action", chunk)

    # ---- imagination --------------------------------------------------------------------------
    @torch.no_grad()
    def imagine(self, obs, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Filter the context `{key: (B, c, ...)}` and predict open loop with raw actions `(B, n, A)`
        (a_c .. a_c+n-1) -> `{"image": (B, n, 3, S, S) in [0, 1], "truth_context": (B, 3, S, S)}`
        (image policies) and the normalized low-dim prediction `"low_dim"`."""
        image, low = self.frames(obs)
        predicted_image, predicted_low = self.world_model.imagine(image, low, self.normalizer.normalize("action", actions))
        out = {}
        if predicted_image is not None:
            out |= {"image": self.display(predicted_image), "last_context": self.display(image[:, -1])}
        if predicted_low is not None:
            out["low_dim"] = predicted_low
        return out

    @torch.no_grad()
    def visualize(self, batch, out_dir) -> list:
        """`imagination.png`: for up to 4 windows, the true frames and the frames imagined open loop
        after filtering the window's first 4 steps (image policies)."""
        from il_policies.visualization import tile_grid, write_png

        T = self.config.n_obs_steps
        context = min(4, T - 1)
        if not self.rgb_keys or T - context < 1:
            return []
        n = min(4, batch["action"].shape[0])
        obs = {k: v[:n] for k, v in batch["obs"].items()}
        imagined = self.imagine({k: v[:, :context] for k, v in obs.items()}, batch["action"][:n, context - 1 : T - 1])["image"]
        truth = self.display(self.frames(obs)[0][:, context:])
        rows = rearrange(torch.stack([truth, imagined], dim=1), "b r t c h w -> (b r) t c h w")
        labels = [f"#{i + 1} {kind}" for i in range(n) for kind in ("true", "imagined")]
        columns = [f"t+{k + 1}" for k in range(T - context)]
        grid = tile_grid(rows, row_labels=labels, col_labels=columns, notes=[f"filtered on {context} frames, then open loop with the recorded actions"])
        return [write_png(grid, Path(out_dir) / "imagination.png")]
