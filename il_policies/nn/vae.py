"""Variational pieces shared by every VAE-type policy (BVAE, VAE+NN, ACT).

- `reparameterize(mu, std, noise_scale)`: z = mu + std * eps * noise_scale, eps ~ N(0, I),
  differentiable in mu and std; `std_from_raw` / `gaussian_from_output`: a network's raw scale
  output as a standard deviation under one of the scale parameterizations.
- `gaussian_kl(mu, logvar)`: KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, summed over
  latent dimensions: 0.5 * sum(mu^2 + exp(logvar) - logvar - 1); `gaussian_kl_between` against any
  diagonal Gaussian (a learned prior): 0.5 * sum(logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1).
- KL weight schedules (constant, linear warm-up, cyclical), as functions of the training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def reparameterize(mu: torch.Tensor, std: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    return mu + std * torch.randn_like(std) * noise_scale


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B,): KL of each sample's diagonal Gaussian from the standard normal."""
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).sum(dim=-1)


def gaussian_kl_between(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (...): KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))), summed over the last dim."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).square()) / logvar_p.exp() - 1.0).sum(dim=-1)


def std_from_raw(raw: torch.Tensor, parameterization: str) -> torch.Tensor:
    """A network's raw scale output -> a standard deviation.

    `logvar`: std = exp(raw / 2) (raw clamped to [-20, 10]); `softplus`: std = softplus(raw) + 1e-4;
    `raw`: std = raw, as the BVAE original (it can be negative: N(mu, raw^2) is the same Gaussian).
    """
    if parameterization == "logvar":
        return torch.exp(0.5 * raw.clamp(-20.0, 10.0))
    if parameterization == "softplus":
        return F.softplus(raw) + 1e-4
    if parameterization == "raw":
        return raw
    raise ValueError(f"unknown scale parameterization {parameterization!r}: use logvar, softplus or raw")


def gaussian_from_output(out: torch.Tensor, parameterization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An encoder's output `(B, 2D)` (mean, raw scale) -> (mu, std, logvar). The logvar of a `raw`
    scale is log(raw^2), finite where the std is negative."""
    mu, raw = out.chunk(2, dim=-1)
    std = std_from_raw(raw, parameterization)
    logvar = raw.clamp(-20.0, 10.0) if parameterization == "logvar" else torch.log(std.square().clamp_min(1e-12))
    return mu, std, logvar


@dataclass
class KLSchedule:
    """The weight of the KL term at a training step.

    kind: `constant` (always `weight`), `linear` (0 -> weight over `warmup_steps`, then constant),
    `cyclical` (Fu et al. 2019: repeated linear ramps; each cycle of `cycle_steps` ramps up during
    its first `ramp_fraction`, then holds `weight`).
    """

    kind: str = "constant"
    weight: float = 1.0
    warmup_steps: int = 1000
    cycle_steps: int = 1000
    ramp_fraction: float = 0.5

    def __post_init__(self):
        if self.kind not in ("constant", "linear", "cyclical"):
            raise ValueError(f"unknown KL schedule {self.kind!r}: use constant, linear or cyclical")
        if self.kind == "cyclical" and self.cycle_steps < 1:
            raise ValueError(f"a cyclical KL schedule needs cycle_steps >= 1, got {self.cycle_steps}")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.weight
        if self.kind == "linear":
            return self.weight * min(1.0, step / max(1, self.warmup_steps))
        position = (step % self.cycle_steps) / self.cycle_steps
        return self.weight * min(1.0, position / self.ramp_fraction) if self.ramp_fraction > 0 else self.weight


__all__ = ["KLSchedule", "gaussian_from_output", "gaussian_kl", "gaussian_kl_between", "reparameterize", "std_from_raw"]
