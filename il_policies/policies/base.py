"""The interface every policy implements, and the observation history / action queue they share.

Conventions:
- A training batch is `{"obs": {key: (B, n_obs_steps, *shape)}, "action": (B, horizon, A),
  "action_is_pad": (B, horizon)}` in raw units, images float CHW in [0, 1]
  (see `il_policies.data.dataset.prepare_batch`). Policies normalize internally with
  `self.normalizer`, which lives in their state_dict.
- A policy implements `compute_loss(batch)` and `_predict_action_chunk(obs, generator)`: the network,
  from `{key: (B, n_obs_steps, *shape)}` to `(B, horizon, A)` raw actions for the steps of its
  `ActionWindow` (`config.action_window()`: the Workspace samples training windows from it).
- The base class turns that into the robot-facing `select_action(obs)` / `predict_action_chunk(obs)`:
  observations checked and converted (numpy or torch, one step or a batch), the observation
  history and the action queue kept here, actions clipped to the recorded bounds and returned as
  numpy for numpy input.
"""

from __future__ import annotations

import abc
import copy
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from il_policies.data.dataset import prepare_batch
from il_policies.data.normalizer import Normalizer
from il_policies.nn.augment import ObservationAugment
from il_policies.nn.temporal_ensemble import TemporalEnsembler
from il_policies.policies.config import ActionWindow, PolicyConfig
from il_policies.policies.observations import check_observation


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
        self.augment = ObservationAugment(config.augment, shape_meta["obs"])
        # What the network is built for: the observations after augmentation (cameras maybe cropped).
        self.network_obs_meta = self.augment.network_obs_meta
        self.window: ActionWindow = config.action_window()
        self._backend: Callable | None = None
        self._init_episode_state()
        self.training_step = 0
        self.register_buffer("action_low", torch.full((self.action_dim,), -torch.inf))
        self.register_buffer("action_high", torch.full((self.action_dim,), torch.inf))

    def normalize_obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model-format observations -> network input: cameras augmented (random in training, the
        center crop in eval mode), then every key normalized. Training and inference both call it."""
        return self.normalizer.normalize_obs(self.augment(obs))

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
    def _predict_action_chunk(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The network: `{key: (B, n_obs_steps, *shape)}` (images float CHW in [0, 1]) -> `(B, horizon, A)`
        actions in raw units for the steps t + window.start, ...; a sampling policy draws its noise
        from `generator` (torch's global generator when None)."""

    def network_noise(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The random inputs a sampling network draws before it runs, by name (Diffusion Policy's initial
        noise); `_predict_action_chunk(obs, noise=...)` takes them instead of drawing its own, so an
        exported graph takes them as inputs and gives the same actions for the same generator. {}: none."""
        return {}

    def use_backend(self, network: Callable | None) -> None:
        """Run `network(obs, generator)` in place of `_predict_action_chunk` (an exported runtime, a
        compiled graph: `il_policies.accel.backends`); None goes back to the policy's own network."""
        self._backend = network

    # Whether `_predict_action_chunk` takes `prefix`: committed actions the chunk must begin with
    # (real-time chunking by inpainting, for sampling policies).
    accepts_prefix = False

    def _run_network(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is None:
            return (self._backend or self._predict_action_chunk)(obs, generator)
        if not self.accepts_prefix or self._backend is not None:
            where = "with an exported backend" if self.accepts_prefix else f"policy {self.name!r}"
            raise ValueError(f"{where} cannot begin a chunk with given actions (prefix): only the torch network of a sampling policy can")
        return self._predict_action_chunk(obs, generator, prefix=prefix)

    def _init_episode_state(self) -> None:
        """Create the per-episode state (policies with more extend this)."""
        self._obs_history: deque[dict[str, torch.Tensor]] = deque(maxlen=self.config.n_obs_steps)
        self._action_queue: deque[torch.Tensor] = deque()
        # The ensembler's running sums belong to the episode (and to each server client's view).
        coeff = self.config.temporal_ensemble_coeff
        self._ensembler = TemporalEnsembler(coeff, self.window.horizon - self.window.current) if coeff is not None else None

    def reset(self) -> None:
        """Forget the observation history and queued actions: call at the start of every episode."""
        self._init_episode_state()

    def episode_view(self) -> "Policy":
        """A policy sharing this one's weights with its own episode state (one per robot/client)."""
        view = copy.copy(self)
        view._init_episode_state()
        return view

    @property
    def metadata(self) -> dict[str, Any]:
        """What a robot needs to know: observation schema, action size and bounds, control rate, task."""
        task = getattr(self, "checkpoint_meta", {}).get("task", {})
        return {
            "policy": self.name,
            "observations": {key: {"shape": list(m["shape"]), "kind": m["kind"]} for key, m in self.shape_meta["obs"].items()},
            "action_dim": self.action_dim,
            "action_low": self.action_low.tolist(),
            "action_high": self.action_high.tolist(),
            "fps": task.get("fps"),
            "task": task.get("name"),
            "n_obs_steps": self.window.n_obs_steps,
            "horizon": self.window.horizon,
            "action_start": self.window.start,
            "n_action_steps": self.window.n_action_steps,
        }

    @torch.inference_mode()
    def select_action(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> Any:
        """One step of observations -> the action to execute now, in raw (robot) units.

        `obs` holds one step `{key: (*shape)}` or a batch `{key: (B, *shape)}` (see
        `observations.check_observation` for what is accepted). The policy keeps the last
        `n_obs_steps` observations itself and runs the network only when its action queue is empty,
        then queues the chunk's actions for steps t .. t + n_action_steps - 1; with temporal ensembling
        (`temporal_ensemble_coeff`) it runs the network every step and averages every chunk's
        prediction for this step (`TemporalEnsembler`). The action is clipped
        to the recorded bounds: numpy `(A,)` / `(B, A)` for numpy input, else a tensor `(B, A)` /
        `(A,)`. Puts the policy in eval mode.
        """
        if self.training:  # (eval() walks every module: not on every call)
            self.eval()
        step, batched, as_numpy = self._observe(obs)
        now = self.window.current
        if self._ensembler is not None:
            chunk = self._run_network(self._stacked_history(), generator)
            return self._deliver(self._ensembler.update(chunk[:, now:]), batched, as_numpy)
        if not self._action_queue:
            chunk = self._run_network(self._stacked_history(), generator)
            self._action_queue.extend(chunk[:, now : now + self.window.n_action_steps].unbind(dim=1))
        return self._deliver(self._action_queue.popleft(), batched, as_numpy)

    @torch.inference_mode()
    def predict_action_chunk(self, obs: Mapping[str, Any], generator: torch.Generator | None = None, prefix: Any = None) -> Any:
        """The predicted actions from the current step on, `(horizon - current, A)` (or with a batch
        dimension), for callers that schedule actions themselves. Puts the policy in eval mode.

        Given one step of robot observations, the observation is added to the history first. Given
        model-format tensors `{key: (B, n_obs_steps, *shape)}`, the network runs on them directly.
        `prefix` (`(B, d, A)` raw actions; policies with `accepts_prefix`): the actions already
        committed for the first d steps, which the chunk then begins with (real-time chunking).
        """
        if self.training:  # (eval() walks every module: not on every call)
            self.eval()
        now = self.window.current
        if prefix is not None:
            prefix = torch.as_tensor(prefix, dtype=torch.float32, device=self.device)
        if self._is_model_format(obs):
            return self._clip(self._run_network(obs, generator, prefix)[:, now:])
        _, batched, as_numpy = self._observe(obs)
        chunk = self._run_network(self._stacked_history(), generator, prefix)[:, now:]
        return self._deliver(chunk, batched, as_numpy)

    def observe(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Add one step of robot observations to the history without running the network; -> the
        network's input for this step, `{key: (B, n_obs_steps, *shape)}`, which
        `predict_action_chunk` accepts (e.g. in another thread: `il_policies.chunk_executor`)."""
        self._observe(obs)
        return self._stacked_history()

    def _observe(self, obs: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], bool, bool]:
        checked, batched, as_numpy = check_observation(obs, self.shape_meta)
        step = self.prepare_obs(checked)
        if not self._obs_history:
            # Before the episode's start, repeat its first frame (as the sampler pads in training).
            self._obs_history.extend([step] * self.config.n_obs_steps)
        else:
            self._obs_history.append(step)
        return step, batched, as_numpy

    def _stacked_history(self) -> dict[str, torch.Tensor]:
        if len(self._obs_history) == 1:  # a view instead of a copy: a camera frame is the costliest tensor here
            return {key: value.unsqueeze(1) for key, value in self._obs_history[0].items()}
        return {key: torch.stack([o[key] for o in self._obs_history], dim=1) for key in self.obs_keys}

    def _is_model_format(self, obs: Mapping[str, Any]) -> bool:
        key = self.obs_keys[0]
        value = obs.get(key) if isinstance(obs, Mapping) else None
        return isinstance(value, torch.Tensor) and value.ndim == len(self.shape_meta["obs"][key]["shape"]) + 2

    def _clip(self, action: torch.Tensor) -> torch.Tensor:
        return torch.clamp(action, self.action_low, self.action_high)

    def _deliver(self, action: torch.Tensor, batched: bool, as_numpy: bool):
        action = self._clip(action if batched else action[0])
        if as_numpy:
            action = action.cpu().numpy()
        finite = np.isfinite(action).all() if as_numpy else torch.isfinite(action).all()
        if not finite:
            raise RuntimeError(f"policy {self.name!r} produced a non-finite action; refusing to return it")
        return action

    def set_action_bounds(self, low, high) -> None:
        """Bounds every returned action is clipped to; stored in the state_dict (so in checkpoints)."""
        self.action_low.copy_(torch.as_tensor(low, dtype=torch.float32))
        self.action_high.copy_(torch.as_tensor(high, dtype=torch.float32))

    def prepare_obs(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Observations to model input: tensors on the policy's device, images float CHW in [0, 1]."""
        return prepare_batch({"obs": {key: obs[key] for key in self.obs_keys}}, self.shape_meta, self.device)["obs"]

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device
