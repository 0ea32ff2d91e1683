"""The shared rollout harness: every policy (and the scripted expert) is evaluated the same way.

Episodes run in waves of `n_envs` parallel gymnasium vector envs, each episode on its own seed.
An episode ends at its first success, or when the env terminates or truncates. Success rate, mean
return, mean length and wall time are reported; the first `n_videos` episodes are saved as mp4.
With `record=True` the harness also returns every episode's observations and actions, which is
how demonstrations are generated (`il_policies.envs.demos`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
from tqdm import tqdm

from il_policies.data.images import chw
from il_policies.envs.base import Task

# Demonstrations use seeds from 0 upwards; evaluation seeds start here, so they never overlap.
EVAL_SEED_START = 1_000_000


class Actor(Protocol):
    """What the harness drives: a batch of observations in, a batch of actions out."""

    def reset(self, seeds: Sequence[int]) -> None: ...

    def act(self, obs: dict[str, np.ndarray], infos: dict[str, Any]) -> np.ndarray: ...


class PolicyActor:
    """Drives a trained `Policy` (its own observation history and action queue)."""

    def __init__(self, policy):
        self.policy = policy

    def reset(self, seeds: Sequence[int]) -> None:
        self.policy.reset()

    def act(self, obs, infos):
        return self.policy.select_action(obs)


class ExpertActor:
    """Drives the task's scripted expert, one instance per parallel env (`policy=expert`)."""

    def __init__(self, task: Task, n_envs: int):
        self.experts = [task.make_expert() for _ in range(n_envs)]

    def reset(self, seeds: Sequence[int]) -> None:
        for expert, seed in zip(self.experts, seeds):
            expert.reset(int(seed))

    def act(self, obs, infos):
        actions = []
        for i, expert in enumerate(self.experts):
            env_obs = {key: value[i] for key, value in obs.items()}
            env_info = {"expert_obs": _env_slice(infos["expert_obs"], i)}
            actions.append(expert.act(env_obs, env_info))
        return np.stack(actions).astype(np.float32)


def _env_slice(value: Any, i: int) -> Any:
    """Env i's entry of a vector env's info value (dict-valued infos arrive as dicts of arrays)."""
    if isinstance(value, dict):
        return {key: _env_slice(item, i) for key, item in value.items() if not key.startswith("_")}
    return value[i]


@dataclass
class RolloutResult:
    task: str
    seeds: list[int]
    successes: list[bool]
    returns: list[float]
    lengths: list[int]
    wall_time_s: float
    videos: list[str] = field(default_factory=list)

    @property
    def n_episodes(self) -> int:
        return len(self.seeds)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.successes)) if self.successes else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "success_rate": self.success_rate,
            "mean_return": float(np.mean(self.returns)),
            "mean_length": float(np.mean(self.lengths)),
            "n_episodes": self.n_episodes,
            "wall_time_s": self.wall_time_s,
        }

    def write_json(self, path: Path, extra: dict | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.summary(), **(extra or {}), **asdict(self)}, indent=2))
        return path


def eval_seeds(n_episodes: int, start: int = EVAL_SEED_START) -> list[int]:
    return list(range(start, start + n_episodes))


def make_vector_env(task: Task, n_envs: int, asynchronous: bool = False) -> gym.vector.VectorEnv:
    # Autoreset disabled: the harness resets whole waves itself, with one seed per env.
    kwargs = {"autoreset_mode": gym.vector.AutoresetMode.DISABLED}
    if asynchronous:
        return gym.vector.AsyncVectorEnv([task.make_env] * n_envs, context="spawn", **kwargs)
    return gym.vector.SyncVectorEnv([task.make_env] * n_envs, **kwargs)


def run_rollouts(
    task: Task,
    actor: Actor,
    seeds: Sequence[int],
    n_envs: int = 1,
    asynchronous: bool = False,
    video_dir: Path | None = None,
    n_videos: int = 0,
    record: bool = False,
    progress: bool = True,
    max_episode_steps: int | None = None,
) -> tuple[RolloutResult, list[dict[str, np.ndarray]] | None]:
    """Run one episode per seed. Returns the result and, with `record`, each episode's data."""
    seeds = [int(s) for s in seeds]
    n_envs = max(1, min(n_envs, len(seeds)))
    max_steps = max_episode_steps or task.max_episode_steps
    env = make_vector_env(task, n_envs, asynchronous)
    result = RolloutResult(task.name, [], [], [], [], 0.0)
    episodes: list[dict[str, np.ndarray]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(seeds), desc=f"rollout {task.name}", disable=not progress, leave=False)
    try:
        for wave_start in range(0, len(seeds), n_envs):
            wave = seeds[wave_start : wave_start + n_envs]
            # A short last wave still steps every env; the padding envs' results are dropped.
            padded = wave + [wave[-1]] * (n_envs - len(wave))
            filming = [wave_start + i < n_videos and video_dir is not None for i in range(len(wave))]
            outcome = _run_wave(env, task, actor, padded, len(wave), max_steps, filming, record)
            for i, seed in enumerate(wave):
                result.seeds.append(seed)
                result.successes.append(outcome["success"][i])
                result.returns.append(outcome["return"][i])
                result.lengths.append(outcome["length"][i])
                if filming[i]:
                    path = Path(video_dir) / f"{task.name}_seed{seed}.mp4"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    imageio.mimsave(path, outcome["frames"][i], fps=min(task.fps, 30), macro_block_size=1)
                    result.videos.append(str(path))
                if record:
                    episodes.append(outcome["episodes"][i])
            bar.update(len(wave))
            bar.set_postfix(success=f"{np.mean(result.successes):.2f}")
    finally:
        bar.close()
        env.close()
    result.wall_time_s = time.perf_counter() - start
    return result, (episodes if record else None)


def _run_wave(env, task: Task, actor: Actor, seeds: list[int], n_real: int, max_steps: int, filming, record):
    n_envs = len(seeds)
    obs, infos = env.reset(seed=seeds)
    actor.reset(seeds)
    done = np.zeros(n_envs, dtype=bool)
    done[n_real:] = True  # padding envs
    success = np.zeros(n_envs, dtype=bool)
    returns = np.zeros(n_envs)
    lengths = np.zeros(n_envs, dtype=int)
    frames: list[list[np.ndarray]] = [[] for _ in range(n_envs)]
    recorded: list[dict[str, list]] = [{key: [] for key in task.keys} for _ in range(n_envs)]

    def film(active):
        wanted = [i for i, f in enumerate(filming) if f and active[i]]
        if wanted:
            images = env.call("render")
            for i in wanted:
                frames[i].append(images[i])

    film(~done)
    for _ in range(max_steps):
        actions = actor.act(obs, infos)
        if record:
            for i in np.flatnonzero(~done):
                for key in task.obs_keys:
                    recorded[i][key].append(obs[key][i])
                recorded[i][task.action_key].append(actions[i])
        obs, rewards, terminated, truncated, infos = env.step(actions)
        active = ~done
        returns[active] += rewards[active]
        lengths[active] += 1
        step_success = np.asarray(infos.get("is_success", np.zeros(n_envs, dtype=bool)), dtype=bool)
        success |= step_success & active
        done |= active & (step_success | terminated | truncated)
        film(active)
        if done.all():
            break
    episodes = [{key: np.stack(values) for key, values in recorded[i].items()} for i in range(n_real)] if record else None
    return {
        "success": success[:n_real].tolist(),
        "return": returns[:n_real].tolist(),
        "length": lengths[:n_real].tolist(),
        "frames": frames,
        "episodes": episodes,
    }


def check_policy_matches_task(shape_meta: dict, task: Task, source: str = "the checkpoint") -> None:
    """Refuse to roll out a policy whose observation keys or shapes differ from the task's."""

    def network_shape(spec):
        return chw(spec.shape) if spec.kind == "rgb" else tuple(spec.shape)

    expected = {key: tuple(meta["shape"]) for key, meta in shape_meta["obs"].items()}
    provided = {key: network_shape(task.keys[key]) for key in task.obs_keys}
    if expected == provided:
        return
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(provided) if expected[k] != provided[k])
    parts = [f"missing from the task: {missing}" if missing else "", f"not used by the policy: {unexpected}" if unexpected else "",
             "different shapes: " + ", ".join(f"{k} {list(expected[k])} vs {list(provided[k])}" for k in reshaped) if reshaped else ""]
    raise ValueError(
        f"{source} expects observation keys {sorted(expected)} but task {task.name!r} provides {sorted(provided)} "
        f"({'; '.join(p for p in parts if p)})"
    )
