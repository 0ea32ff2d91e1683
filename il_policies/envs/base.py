"""What a task is: an environment factory, its observation keys, a scripted expert, a success signal.

Every simulator adapter (Meta-World, ALOHA, ...) returns `Task` objects; the data generator, the
rollout harness and the Workspace only ever talk to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np

from il_policies.data.store import KeySpec


class Expert(Protocol):
    """A scripted demonstrator. `info` carries privileged simulator state (`info["expert_obs"]`)."""

    def reset(self, seed: int) -> None: ...

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray: ...


@dataclass(frozen=True)
class Task:
    """A named, fully specified task.

    `make_env()` builds a gymnasium env whose observations are dicts keyed exactly as
    `keys` (minus the action key), whose `info` holds `is_success` (bool) after every step and
    `expert_obs` (whatever the expert needs) after reset and every step. The env truncates at
    `max_episode_steps`. Images are HWC uint8.
    """

    name: str
    keys: dict[str, KeySpec]  # observation keys and the action key, as stored in the Zarr store
    make_env: Callable[[], gym.Env]
    make_expert: Callable[[], Expert]
    max_episode_steps: int
    fps: float
    action_low: np.ndarray
    action_high: np.ndarray

    @property
    def action_key(self) -> str:
        return next(k for k, spec in self.keys.items() if spec.kind == "action")

    @property
    def obs_keys(self) -> list[str]:
        return sorted(k for k, spec in self.keys.items() if spec.kind != "action")
