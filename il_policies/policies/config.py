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


AUGMENTATIONS = ("none", "crop", "shift")


@dataclass
class AugmentConfig:
    """Image augmentation of every camera in training (`il_policies.nn.augment`).

    - `crop`: a random crop of `crop_ratio` of each side in training, the center crop at evaluation
      and on the robot (diffusion_policy's and robomimic's recipe; the network sees the cropped size).
    - `shift`: pad `shift_pixels` on each side by repeating the edge and crop back to the full size
      at a random offset in training (DrQ's random shift); the image as it is at evaluation.
    - `color_jitter` > 0: brightness, contrast and saturation each scaled by a factor drawn from
      U(1 - j, 1 + j) in training only.
    """

    kind: str = "none"  # none | crop | shift
    crop_ratio: float = 0.9
    shift_pixels: int = 4
    color_jitter: float = 0.0

    def __post_init__(self):
        if self.kind not in AUGMENTATIONS:
            raise ValueError(f"augment.kind {self.kind!r} is not one of {AUGMENTATIONS}")
        if not 0.0 < self.crop_ratio <= 1.0:
            raise ValueError(f"augment.crop_ratio must be in (0, 1], got {self.crop_ratio}")
        if self.shift_pixels < 0 or not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"augment.shift_pixels must be >= 0 and augment.color_jitter in [0, 1), got "
                             f"{self.shift_pixels} and {self.color_jitter}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none" or self.color_jitter > 0


BACKBONES = ("conv", "resnet18", "resnet34")
NORMS = ("group", "batch", "frozen")
POOLS = ("grid", "spatial_softmax", "avgpool", "flatten")


@dataclass
class VisionConfig:
    """One camera's image encoder (`il_policies.nn.vision.ImageEncoder`): backbone -> pooling -> linear."""

    backbone: str = "conv"  # conv (small strided convolutions) | resnet18 | resnet34 (torchvision's)
    norm: str = "group"  # ResNet normalization: group | batch | frozen (FrozenBatchNorm; needs `weights`)
    weights: str | None = None  # a local torchvision ResNet state_dict file (nothing is downloaded)
    pool: str = "grid"  # grid (average-pooled to grid x grid, every cell kept) | flatten (the whole map) | spatial_softmax (keypoints) | avgpool
    grid: int = 4  # pool=grid
    num_keypoints: int = 32  # pool=spatial_softmax
    feature_dim: int = 64  # each camera's output
    conv_channels: tuple[int, ...] = (32, 64, 128)  # backbone=conv: one stride-2 stage per width
    shared: bool = False  # one encoder for every camera (they must share a shape) instead of one each

    def __post_init__(self):
        for name, value, allowed in (("backbone", self.backbone, BACKBONES), ("norm", self.norm, NORMS), ("pool", self.pool, POOLS)):
            if value not in allowed:
                raise ValueError(f"vision.{name} {value!r} is not one of {allowed}")
        if self.norm == "frozen" and not self.weights:
            raise ValueError("vision.norm 'frozen' keeps BatchNorm's statistics fixed: it needs vision.weights "
                             "(a randomly initialized frozen BatchNorm is the identity)")


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
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Temporal ensembling (ACT): with n_action_steps = 1, the executed action is the average of every
    # chunk's prediction for the current step, weighted exp(-k i) with i = 0 the oldest; e.g. k = 0.01.
    temporal_ensemble_coeff: float | None = None
    training_preset: TrainingPreset = field(default_factory=TrainingPreset)

    def __post_init__(self):
        for name in ("n_obs_steps", "horizon", "n_action_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        window = self.action_window()
        if window.current + self.n_action_steps > window.horizon:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed the actions predicted from the current step on "
                f"({window.horizon - window.current} of the horizon {window.horizon})"
            )
        if self.temporal_ensemble_coeff is not None and self.n_action_steps != 1:
            raise ValueError("temporal ensembling queries the policy every step: set n_action_steps=1")
        if self.image_norm_per_pixel and self.augment.kind != "none":
            raise ValueError("per-pixel image statistics are fitted on the full image: use augment.kind=none with "
                             "image_norm_per_pixel, or per-channel statistics with crop / shift")

    def use_imagenet_statistics(self) -> None:
        """For a backbone loaded with ImageNet weights: images normalized as it was trained (unless
        `normalization` sets the rgb mode itself); called by configs whose backbone has a weights file."""
        if "rgb" not in self.normalization:
            self.normalization = {**self.normalization, "rgb": "imagenet"}

    def action_window(self) -> ActionWindow:
        """The chunk starts at the current step; a policy that predicts earlier steps overrides this."""
        return ActionWindow(self.n_obs_steps, self.horizon, 0, self.n_action_steps)


def loss_weights_of(weights: Mapping[str, float], terms: tuple[str, ...]) -> dict[str, float]:
    """A policy's `loss_weights` option checked against its terms: every term, a term left out weighing 0."""
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown} in loss_weights; the terms are {list(terms)}")
    return {term: float(weights.get(term, 0.0)) for term in terms}


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


__all__ = ["ActionWindow", "AugmentConfig", "EMAPreset", "PolicyConfig", "TrainingPreset", "VisionConfig", "config_from_dict", "loss_weights_of"]
