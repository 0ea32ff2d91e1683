"""Demonstrations from a task's scripted expert, written to a Zarr trajectory store.

The expert runs through the same rollout harness as every policy. Seeds `seed_start`,
`seed_start + 1`, ... are tried in order until `n_episodes` successful episodes are kept (or, with
`keep_failures`, until `n_episodes` were tried), so the same arguments always give the same store.

Generation is resumable: the store records its target (the arguments above) and, committed with each
episode, the progress (`seeds_tried`: the seeds up to the last kept one, `expert_successes` among
them) and `complete`. The same call on an incomplete store continues after the last kept seed, so an
interrupted run resumed ends with exactly the store an uninterrupted run writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from il_policies.data.store import StoreError, TrajectoryStore
from il_policies.envs.base import Task

TARGET_FIELDS = ("generator", "task", "task_options", "seed_start", "n_episodes", "keep_failures")


def generation_target(task: Task, n_episodes: int, seed_start: int = 0, keep_failures: bool = False,
                      task_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a generated store was asked to hold (recorded in its provenance, compared on resume)."""
    return {"generator": "scripted_expert", "task": task.name, "task_options": dict(task_options or {}),
            "seed_start": int(seed_start), "n_episodes": int(n_episodes), "keep_failures": bool(keep_failures)}


def generation_state(store: TrajectoryStore) -> tuple[dict[str, Any] | None, bool]:
    """(target, complete) of a store written by generate_demos; (None, True) for any other store.
    Stores written before generation was resumable record no `complete` flag: they were complete."""
    prov = store.provenance
    if prov.get("generator") != "scripted_expert" or "n_episodes" not in prov:
        return None, True
    return {k: prov.get(k) for k in TARGET_FIELDS}, bool(prov.get("complete", True))


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
    image_codec: str | None = None,
) -> TrajectoryStore:
    """Write (or continue writing) the store; an existing complete store with the same target is
    returned as it is, one with another target is refused (unless `overwrite`). `image_codec`
    (e.g. "jpeg:95") stores the cameras as images per frame in a new store."""
    from il_policies.rollout import EVAL_SEED_START, ExpertActor, run_rollouts

    if isinstance(n_episodes, bool) or not isinstance(n_episodes, int) or n_episodes < 1:
        raise ValueError(f"n_episodes must be a positive integer, got {n_episodes!r}")
    max_attempts = max_attempts or 3 * n_episodes + 10
    if seed_start + max_attempts > EVAL_SEED_START:
        raise ValueError(f"demonstration seeds must stay below the evaluation seeds ({EVAL_SEED_START})")
    target = generation_target(task, n_episodes, seed_start, keep_failures, task_options)
    path = Path(path)
    if path.exists() and not overwrite:
        store = TrajectoryStore.open(path, mode="a")
        recorded, complete = generation_state(store)
        if recorded != target:
            differ = sorted(k for k in TARGET_FIELDS if (recorded or {}).get(k) != target[k])
            raise StoreError(f"trajectory store {path}: it was generated for {_describe_target(recorded)} but this run "
                             f"asks for {_describe_target(target)} (differing: {', '.join(differ)}); pass overwrite=true "
                             f"to replace it or choose another output path.")
        if complete:
            return store
        tqdm.write(f"{path}: incomplete ({store.n_episodes} of {n_episodes} episodes), continuing the generation")
    else:
        store = TrajectoryStore.create(path, task.keys, fps=task.fps, task=task.name, overwrite=overwrite, image_codec=image_codec,
                                       provenance={**target, "complete": False, "seeds_tried": 0, "expert_successes": 0})
    kept = store.n_episodes
    seeds_kept = store.episode_seeds
    tried = int(seeds_kept[-1]) + 1 - seed_start if kept else 0
    successes = int(store.provenance.get("expert_successes", 0))
    actor = ExpertActor(task, n_envs)
    bar = tqdm(total=n_episodes, initial=kept, desc=f"generate {task.name}", unit="episode")
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
        for seed, success, episode in zip(seeds, result.successes, episodes):
            if kept < n_episodes and (success or keep_failures):
                successes += bool(success)
                kept += 1
                store.append_episode(episode, seed=seed, provenance={
                    "seeds_tried": seed + 1 - seed_start, "expert_successes": successes, "complete": kept == n_episodes})
                bar.update(1)
        tried += len(seeds)
        bar.set_postfix(expert_success=f"{successes}/{store.provenance['seeds_tried']}")
    bar.close()
    return store


def ensure_demos(task: Task, path: str | Path, n_episodes: int, task_options: dict[str, Any] | None = None) -> None:
    """train.py's dataset step: generate the demonstrations when the store is missing, continue the
    recorded generation when an interrupted one left it incomplete, leave any complete store alone."""
    path = Path(path)
    if not path.exists():
        tqdm.write(f"dataset {path} not found: generating {n_episodes} demonstrations of {task.name} with the scripted expert")
        generate_demos(task, path, n_episodes, task_options=task_options)
        return
    target, complete = generation_state(TrajectoryStore.open(path))
    if not complete:  # generate_demos refuses it, naming both, if it was made with other task options
        generate_demos(task, path, target["n_episodes"], seed_start=target["seed_start"],
                       keep_failures=target["keep_failures"], task_options=task_options)


def check_generation_complete(store: TrajectoryStore) -> None:
    """Refuse to train on a store whose generation was interrupted (the task=dataset path, where
    train.py has no expert to finish it with)."""
    target, complete = generation_state(store)
    if not complete:
        raise ValueError(f"dataset {store.path} is incomplete: its generation stopped at {store.n_episodes} of "
                         f"{target['n_episodes']} episodes; rerun the datasets/generate.py command that made it to finish it")


def _describe_target(target: dict | None) -> str:
    if target is None:
        return "something other than generate_demos (no generation target recorded)"
    options = f" with options {target['task_options']}" if target["task_options"] else ""
    failures = ", keeping failures" if target["keep_failures"] else ""
    return f"{target['n_episodes']} episodes of {target['task']}{options} from seed {target['seed_start']}{failures}"


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
