"""Demonstrations from a task's scripted expert, written to a Zarr trajectory store.

The expert runs through the same rollout harness as every policy. Seeds `seed_start`,
`seed_start + 1`, ... are tried in order until `n_episodes` successful episodes are kept (or, with
`keep_failures`, until `n_episodes` were tried), so the same arguments always give the same store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from il_policies.data.store import TrajectoryStore
from il_policies.envs.base import Task


def generate_demos(
    task: Task,
    path: str | Path,
    n_episodes: int,
    seed_start: int = 0,
    keep_failures: bool = False,
    overwrite: bool = False,
    n_envs: int = 1,
    max_attempts: int | None = None,
    task_options: dict[str, Any] | None = None,
) -> TrajectoryStore:
    from il_policies.rollout import EVAL_SEED_START, ExpertActor, run_rollouts

    max_attempts = max_attempts or 3 * n_episodes + 10
    if seed_start + max_attempts > EVAL_SEED_START:
        raise ValueError(f"demonstration seeds must stay below the evaluation seeds ({EVAL_SEED_START})")
    store = TrajectoryStore.create(
        path, task.keys, fps=task.fps, task=task.name, overwrite=overwrite,
        provenance={"generator": "scripted_expert", "task": task.name, "task_options": dict(task_options or {}),
                    "seed_start": seed_start, "keep_failures": keep_failures},
    )
    actor = ExpertActor(task, n_envs)
    kept = tried = successes = 0
    bar = tqdm(total=n_episodes, desc=f"generate {task.name}", unit="episode")
    while kept < n_episodes:
        if tried >= max_attempts:
            raise RuntimeError(
                f"the {task.name} expert succeeded on only {kept} of {tried} seeds; stopped before {n_episodes} demonstrations"
            )
        # One harness call per round (building the envs costs more than a short episode); the
        # first round asks for exactly the missing count, later rounds for a few more.
        wanted = n_episodes - kept
        seeds = list(range(seed_start + tried, seed_start + tried + min(wanted + (wanted if tried else 0), max_attempts - tried)))
        result, episodes = run_rollouts(task, actor, seeds, n_envs=n_envs, record=True)
        successes += sum(result.successes)
        for seed, success, episode in zip(seeds, result.successes, episodes):
            if kept < n_episodes and (success or keep_failures):
                store.append_episode(episode, seed=seed)
                kept += 1
                bar.update(1)
        tried += len(seeds)
        bar.set_postfix(expert_success=f"{successes}/{tried}")
    bar.close()
    store.update_provenance({"seeds_tried": tried, "expert_successes": successes})
    return store


def check_store_matches_task(store: TrajectoryStore, task: Task) -> None:
    """Refuse a dataset made for another task or observation variant than the one asked for."""
    if store.task is not None and store.task != task.name:
        raise ValueError(f"dataset {store.path} was generated for task {store.task!r}, but the config asks for {task.name!r}")
    ours = {key: (spec.shape, spec.kind) for key, spec in task.keys.items()}
    theirs = {key: (spec.shape, spec.kind) for key, spec in store.keys.items()}
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()))
        raise ValueError(
            f"dataset {store.path} has keys {_describe(theirs)} but task {task.name!r} produces {_describe(ours)} "
            f"(differing: {sorted({key for key, _ in differing})})"
        )


def _describe(keys: dict) -> str:
    return "{" + ", ".join(f"{k}: {list(shape)}" for k, (shape, _) in sorted(keys.items())) + "}"
