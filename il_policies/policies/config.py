"""What every policy's config holds, and building a config from a plain mapping.

A policy's config is a dataclass extending `PolicyConfig`, checked in `__post_init__`. The same
dataclasses are the Hydra structured configs of `conf/policy/` (`il_policies/training/config.py`
registers them), and `config_from_dict` rebuilds one from a checkpoint without Hydra.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ActionWindow:
    """Which steps a policy sees and predicts, relative to the current step t.

    Observations t - n_obs_steps + 1 .. t; predicted actions t + start .. t + start + horizon - 1
    (`start` <= 0: a policy may predict the actions of the steps it observed, as Diffusion Policy
    does); the actions executed per network call: t .. t + n_action_steps - 1.
    """

    n_obs_steps: int
    horizon: int
    start: int
    n_action_steps: int

    @property
    def current(self) -> int:
        """Index of the current step's action in a predicted chunk."""
        return -self.start


@dataclass
class EMAPreset:
    enabled: bool = False
    decay: float = 0.9999  # the ceiling; diffusers warms the decay up as (1 + step / inv_gamma) ** -power
    power: float = 0.75


@dataclass
class TrainingPreset:
    """How a policy trains by default: AdamW, a diffusers LR schedule, gradient clipping and EMA.
    Each value is overridden by the same-named `training.*` option when that one is set."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-6
    lr_scheduler: str = "cosine"  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 100
    grad_clip: float = 10.0  # max gradient norm; 0 clips nothing
    ema: EMAPreset = field(default_factory=EMAPreset)


@dataclass
class PolicyConfig:
    """Options every policy has. Subclasses add their own fields and checks in `__post_init__`."""

    name: str = ""  # the registry name; each policy's config sets its own
    n_obs_steps: int = 1  # observations the policy sees: the current one and n_obs_steps - 1 before it
    horizon: int = 1  # actions predicted per network call
    n_action_steps: int = 1  # actions of each chunk executed before the network runs again
    # Normalization mode per kind (low_dim / rgb / action) or per key: gaussian | minmax | identity.
    normalization: dict[str, str] = field(default_factory=dict)
    image_norm_per_pixel: bool = False
    training_preset: TrainingPreset = field(default_factory=TrainingPreset)

    def __post_init__(self):
        for name in ("n_obs_steps", "horizon", "n_action_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        window = self.action_window()
        if window.current + self.n_action_steps > self.horizon:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed the actions predicted from the current step on "
                f"({self.horizon - window.current} of the horizon {self.horizon})"
            )

    def action_window(self) -> ActionWindow:
        """The chunk starts at the current step; a policy that predicts earlier steps overrides this."""
        return ActionWindow(self.n_obs_steps, self.horizon, 0, self.n_action_steps)


def config_from_dict(config_class: type, options: Mapping[str, Any], where: str = "policy") -> Any:
    """`config_class(**options)`, with nested dataclass fields built from mappings and lists turned
    into tuples where the field is a tuple; an unknown option is refused in one sentence."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"{where} {config_class.__name__} has no option(s) {unknown}; its options are {sorted(fields)}")
    hints = typing.get_type_hints(config_class)
    return config_class(**{key: _coerce(hints[key], value, f"{where}.{key}") for key, value in options.items()})


def _coerce(annotation, value, where: str):
    options = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    for option in options:
        if dataclasses.is_dataclass(option) and isinstance(value, Mapping):
            return config_from_dict(option, value, where)
        if (option is tuple or typing.get_origin(option) is tuple) and isinstance(value, (list, tuple)):
            return tuple(value)
    return value


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


__all__ = ["ActionWindow", "EMAPreset", "PolicyConfig", "TrainingPreset", "config_from_dict"]
