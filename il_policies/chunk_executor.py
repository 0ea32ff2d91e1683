"""Asynchronous action-chunk execution: the next chunk is computed while the current one runs.

    executor = ChunkExecutor(policy, rate_hz=50)        # or latency_steps=k: a simulated delay
    executor.reset()
    action = executor.select_action(obs)                # at once, from the current chunk
    executor.close()                                    # (or `with ChunkExecutor(...) as executor:`)

At every step the executor

1. adds the observation to the policy's history (every step, so a policy with `n_obs_steps > 1`
   sees each one);
2. takes in a finished inference, if there is one. Its chunk was predicted from the observation
   of the step it was requested at, so the actions for the steps elapsed since are dropped
   (latency compensation, by step count), and the rest is blended with what remains of the
   current plan over their overlap; the plan then ends where the new chunk ends;
3. when fewer than `threshold` actions remain and no inference is in flight, starts the next one
   on this step's observation, in a background thread (`latency_steps=None`) or held back for
   exactly `latency_steps` steps (a simulated delay: deterministic, for simulation and tests);
4. returns the plan's next action. With the plan empty (the first step of an episode, or an
   inference slower than the actions left) it waits for the inference: a stall, counted.

Blending over the overlap of n steps (`blend`):
- `replace`: the new chunk's actions;
- `linear`: a cross-fade, weight (i + 1) / (n + 1) on the new action at overlap step i;
- `ensemble`: ACT's temporal ensembling: every chunk's prediction for a step weighs
  exp(-k * j), j = 0 for the oldest prediction of that step (k = `ensemble_coeff`, 0.01 in ACT).

`commit_steps=d` (real-time chunking, for policies that take a `prefix`: Diffusion Policy): each
chunk is requested with the plan's next d actions, the ones the robot executes while the chunk is
computed, and the policy generates a chunk that begins with them (inpainting), so that the new
actions continue the committed ones instead of being blended with them afterwards.

`threshold=None` derives it from the latency: `latency_steps + 1` when simulated, else
ceil(1.5 * the slowest of the last 8 inferences * rate_hz) + 1 (the first inference, which the
first step waits for, is the first measurement).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

BLENDS = ("replace", "linear", "ensemble")


def blend_weights(n: int, mode: str, previous_counts: np.ndarray | None = None, coeff: float = 0.01) -> np.ndarray:
    """Weight of the new chunk at each of `n` overlapping steps (the plan gets 1 - weight).
    `ensemble` needs how many predictions each step already holds (`previous_counts`)."""
    if mode == "replace":
        return np.ones(n)
    if mode == "linear":
        return np.arange(1, n + 1) / (n + 1)
    if mode == "ensemble":
        counts = np.asarray(previous_counts, dtype=np.float64)
        # weights exp(-k j) for the j-th prediction of a step: the plan holds predictions 0..c-1
        # (total weight sum_j<c exp(-k j)); the new one is the c-th.
        new = np.exp(-coeff * counts)
        held = (1 - np.exp(-coeff * counts)) / (1 - math.exp(-coeff)) if coeff else counts
        return new / (new + held)
    raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {mode!r}")


class ChunkExecutor:
    """Runs `policy.predict_action_chunk` ahead of time and serves its actions step by step (numpy).

    `policy` needs `reset()`, `observe(obs)` (adds a step to its history, returns the input of
    `predict_action_chunk`) and `predict_action_chunk(input)` -> `(1, n, A)` raw actions (torch or
    numpy): a `Policy`, or the policy server's client (`PolicyClient(asynchronous=True)`)."""

    def __init__(self, policy: Any, rate_hz: float | None = None, threshold: int | None = None, blend: str = "linear",
                 ensemble_coeff: float = 0.01, latency_steps: int | None = None, commit_steps: int = 0,
                 clock: Callable[[], float] = time.perf_counter):
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
        if commit_steps and not getattr(policy, "accepts_prefix", False):
            raise ValueError(f"commit_steps needs a policy that begins a chunk with given actions (Diffusion Policy), not {type(policy).__name__}"
                             f"{' ' + repr(policy.name) if hasattr(policy, 'name') else ''}")
        if commit_steps < 0:
            raise ValueError(f"commit_steps must be >= 0, got {commit_steps}")
        if latency_steps is None and threshold is None and not (rate_hz and rate_hz > 0):
            raise ValueError("give rate_hz (the control rate the threshold is derived from), a threshold, or latency_steps")
        if latency_steps is not None and latency_steps < 0:
            raise ValueError(f"latency_steps must be >= 0, got {latency_steps}")
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.policy, self.rate_hz, self.blend, self.ensemble_coeff = policy, rate_hz, blend, ensemble_coeff
        self.latency_steps, self._threshold, self.clock, self.commit_steps = latency_steps, threshold, clock, commit_steps
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-inference") if latency_steps is None else None
        self._durations: deque[float] = deque(maxlen=8)
        self.reset_counters()
        self._clear_episode()

    # ---- episode state ------------------------------------------------------------------------
    def _clear_episode(self) -> None:
        self.step = 0  # steps served this episode
        self._plan = np.empty((0, 0))  # (n, A): the actions for steps self.step, self.step + 1, ...
        self._counts = np.empty(0, dtype=np.int64)  # predictions blended into each planned step
        self._pending: tuple[int, Any, int | None] | None = None  # (requested at, Future | chunk | error, ready at)
        self._last_action: np.ndarray | None = None
        self._merged = False  # a chunk came in since the last action was served

    def reset_counters(self) -> None:
        self.stalls = 0  # steps that waited for an inference
        self.stale_chunks = 0  # chunks that arrived after all their actions' steps had passed
        self.inferences = 0
        self.boundary_jumps: list[float] = []  # L2 between the action before and the first after a chunk came in

    def reset(self) -> None:
        """Start a new episode: wait out an inference in flight, forget the plan and the history."""
        self._wait_pending()
        self._clear_episode()
        self.policy.reset()

    def close(self) -> None:
        """Stop the worker thread (after the inference in flight, if any)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None

    def __enter__(self) -> ChunkExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the step -----------------------------------------------------------------------------
    @property
    def threshold(self) -> int:
        if self._threshold is not None:
            return self._threshold
        if self.latency_steps is not None:
            return self.latency_steps + 1
        if not self._durations:
            return 1
        return math.ceil(1.5 * max(self._durations) * self.rate_hz) + 1

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """One step of unbatched robot observations -> the action for this step, `(A,)` numpy."""
        model_obs = self.policy.observe(obs)
        self._take_finished()
        if len(self._plan) < self.threshold and self._pending is None:
            self._request(model_obs)
            self._take_finished()  # a simulated latency of 0 steps, or an inference already done
        if not len(self._plan):
            self.stalls += 1
            self._take_finished(wait=True)
            if not len(self._plan):  # the chunk arrived stale even so (a latency longer than the chunk)
                raise RuntimeError(f"the chunk requested at step {self.step} had no action left for step {self.step} when it arrived")
        action, self._plan, self._counts = self._plan[0], self._plan[1:], self._counts[1:]
        if self._merged and self._last_action is not None:
            self.boundary_jumps.append(float(np.linalg.norm(action - self._last_action)))
        self._last_action, self._merged = action, False
        self.step += 1
        return action

    def _request(self, model_obs: Any) -> None:
        self.inferences += 1
        committed = self._plan[: self.commit_steps]
        prefix = committed[None] if len(committed) else None
        if self._worker is None:  # simulated latency: computed now, delivered (or its error raised) latency_steps later
            try:
                result = self._timed_chunk(model_obs, prefix)
            except Exception as error:
                result = error
            self._pending = (self.step, result, self.step + self.latency_steps)
        else:
            self._pending = (self.step, self._worker.submit(self._timed_chunk, model_obs, prefix), None)

    def _timed_chunk(self, model_obs: Any, prefix: np.ndarray | None = None) -> np.ndarray:
        start = self.clock()
        options = {} if prefix is None else {"prefix": prefix}
        chunk = self.policy.predict_action_chunk(model_obs, **options)  # (1, horizon - current, A), clipped to the bounds
        chunk = np.asarray(chunk.cpu() if hasattr(chunk, "cpu") else chunk, dtype=np.float32)
        self._durations.append(self.clock() - start)
        if chunk.ndim != 3 or chunk.shape[0] != 1:
            raise ValueError(f"the chunk executor serves one robot: predict_action_chunk gave shape {chunk.shape}, not (1, n, A)")
        return chunk[0]

    def _wait_pending(self) -> None:
        if self._pending is not None and isinstance(self._pending[1], Future):
            try:
                self._pending[1].result()
            except Exception:  # an episode's end discards its inference, failed or not
                pass
        self._pending = None

    def _take_finished(self, wait: bool = False) -> None:
        if self._pending is None:
            return
        requested_at, result, ready_at = self._pending
        if isinstance(result, Future):
            if not (wait or result.done()):
                return
            error = result.exception()
            chunk = None if error else result.result()
        else:
            if not wait and self.step < ready_at:
                return
            error, chunk = (result, None) if isinstance(result, Exception) else (None, result)
        self._pending = None
        if error is not None:
            raise RuntimeError(f"the background inference of the chunk requested at step {requested_at} failed: "
                               f"{type(error).__name__}: {error}") from error
        self._merge(chunk[self.step - requested_at :])

    def _merge(self, new: np.ndarray) -> None:
        """Blend `new` (actions for steps self.step, ...) into the plan over their overlap."""
        if not len(new):
            self.stale_chunks += 1
            return
        self._merged = True
        n = min(len(self._plan), len(new))
        weights = blend_weights(n, self.blend, self._counts[:n], self.ensemble_coeff).astype(np.float32)[:, None]
        blended = (1 - weights) * self._plan[:n] + weights * new[:n] if n else new[:0]
        counts = self._counts[:n] + 1 if self.blend == "ensemble" else np.ones(n, dtype=np.int64)
        self._plan = np.concatenate([blended, new[n:]])
        self._counts = np.concatenate([counts, np.ones(len(new) - n, dtype=np.int64)])


class ChunkExecutorActor:
    """The rollout harness's actor (`il_policies.rollout.Actor`) for asynchronous execution in
    simulation: one ChunkExecutor per parallel env, each on its own episode view of the policy,
    with a simulated inference latency of `latency_steps` control steps."""

    def __init__(self, policy: Any, n_envs: int, latency_steps: int, **options):
        self.executors = [ChunkExecutor(policy.episode_view(), latency_steps=latency_steps, **options) for _ in range(n_envs)]

    def reset(self, seeds) -> None:
        for executor in self.executors:
            executor.reset()

    def act(self, obs, infos):
        return np.stack([executor.select_action({key: value[i] for key, value in obs.items()})
                         for i, executor in enumerate(self.executors)])

    @property
    def boundary_jumps(self) -> list[float]:
        return [jump for executor in self.executors for jump in executor.boundary_jumps]


__all__ = ["BLENDS", "ChunkExecutor", "ChunkExecutorActor", "blend_weights"]
