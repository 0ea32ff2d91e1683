"""The interface every policy implements, and the observation history / action queue they share.

Conventions:
- A training batch is `{"obs": {key: (B, n_obs_steps, *shape)}, "action": (B, horizon, A),
  "action_is_pad": (B, horizon)}` in raw units, images float CHW in [0, 1]
  (see `il_policies.data.dataset.prepare_batch`). Policies normalize internally with
  `self.normalizer`, which lives in their state_dict.
- `predict_action_chunk(obs)` takes `{key: (B, n_obs_steps, *shape)}` and returns
  `(B, horizon, A)` actions in raw units, the first one for the current step.
- `select_action(obs)` takes one step `{key: (B, *shape)}` (images uint8 HWC or float CHW), keeps
  the last `n_obs_steps` observations itself, runs the network only when its action queue is empty
  and then queues `n_action_steps` actions of the chunk.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn

from il_policies.data.dataset import prepare_batch
from il_policies.data.normalizer import Normalizer


@dataclass
class PolicyConfig:
    """Options every policy has. Subclasses add their own fields and checks in `__post_init__`."""

    n_obs_steps: int = 1  # observations the policy sees: the current one and n_obs_steps - 1 before it
    horizon: int = 1  # actions predicted per network call, starting at the current step
    n_action_steps: int = 1  # actions of each chunk executed before the network runs again
    lr: float = 1e-3
    weight_decay: float = 1e-6
    # Normalization mode per kind (low_dim / rgb / action) or per key: gaussian | minmax | identity.
    normalization: dict[str, str] = field(default_factory=dict)
    image_norm_per_pixel: bool = False

    def __post_init__(self):
        for name in ("n_obs_steps", "horizon", "n_action_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_action_steps > self.horizon:
            raise ValueError(
                f"n_action_steps ({self.n_action_steps}) cannot exceed the predicted horizon ({self.horizon})"
            )


class Policy(nn.Module, abc.ABC):
    name: ClassVar[str]  # set by @register_policy
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig, shape_meta: Mapping[str, Any]):
        super().__init__()
        self.config = config
        self.shape_meta = shape_meta
        self.obs_keys = sorted(shape_meta["obs"])
        self.action_dim = int(shape_meta["action"]["shape"][0])
        self.normalizer = Normalizer(shape_meta, config.normalization, per_pixel=config.image_norm_per_pixel)
        self._obs_history: deque[dict[str, torch.Tensor]] = deque(maxlen=config.n_obs_steps)
        self._action_queue: deque[torch.Tensor] = deque()
        self.training_step = 0

    # ---- training -----------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss and a dict of named float metrics (every loss term, for logging)."""

    def set_training_step(self, step: int) -> None:
        """Called by the Workspace before every training step (and after resuming), for schedules
        such as KL annealing that depend on the step."""
        self.training_step = step

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        # DistributedDataParallel synchronizes gradients of what runs through forward().
        return self.compute_loss(batch)

    def optim_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer; policies with e.g. a backbone learning rate override it."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def visualize(self, batch: Mapping[str, Any], out_dir) -> list:
        """Optional pictures of what the model learned (e.g. a latent traversal grid), written under
        `out_dir` at each evaluation and logged; returns the PNG paths. Default: none."""
        return []

    # ---- inference ----------------------------------------------------------------------------
    @abc.abstractmethod
    def predict_action_chunk(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`{key: (B, n_obs_steps, *shape)}` -> `(B, horizon, A)` actions in raw units."""

    def reset(self) -> None:
        """Forget the observation history and queued actions: call at the start of every episode."""
        self._obs_history.clear()
        self._action_queue.clear()

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any]) -> torch.Tensor:
        """One step of observations `{key: (B, *shape)}` -> the action `(B, A)` for this step."""
        step = self.prepare_obs(obs)
        if not self._obs_history:
            # Before the episode's start, repeat its first frame (as the sampler pads in training).
            self._obs_history.extend([step] * self.config.n_obs_steps)
        else:
            self._obs_history.append(step)
        if not self._action_queue:
            stacked = {key: torch.stack([o[key] for o in self._obs_history], dim=1) for key in self.obs_keys}
            chunk = self.predict_action_chunk(stacked)
            self._action_queue.extend(rearrange(chunk[:, : self.config.n_action_steps], "b t a -> t b a"))
        return self._action_queue.popleft()

    def prepare_obs(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Robot/env observations to model input: tensors on the policy's device, images float CHW in [0, 1]."""
        return prepare_batch({"obs": {key: obs[key] for key in self.obs_keys}}, self.shape_meta, self.device)["obs"]

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device
