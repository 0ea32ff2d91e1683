"""A benchmark's grid (`conf/benchmark/NAME.yaml`) as cells: one ordinary `train.py` run each.

A cell is a task, a policy config (with its overrides), a seed and a number of training episodes.
It lives in `<out>/cells/<name>/`: Hydra's run directory of its `train.py` (checkpoints, the
`metrics.jsonl` curves), `train.log`, and `result.json`, written atomically when the run has
finished: a cell with a `result.json` is done and never run again; any other is run with the same
command, which resumes from its `latest` checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from il_policies.atomic import replaced_atomically

REPO = Path(__file__).resolve().parents[2]


class BenchmarkError(ValueError):
    """A benchmark config value that cannot be run."""


@dataclass(frozen=True)
class Cell:
    index: int
    task: str
    policy: str  # the grid's label: a policy config name, or a variant's name
    policy_overrides: tuple[str, ...]
    seed: int
    train_episodes: int | None  # None: every training episode of the dataset
    policy_config: str = ""  # conf/policy/NAME (the label when empty)

    @property
    def name(self) -> str:
        episodes = "all" if self.train_episodes is None else self.train_episodes
        return f"{self.task}__{self.policy}__episodes-{episodes}__seed-{self.seed}"

    def directory(self, out: Path) -> Path:
        return out / "cells" / self.name

    def done(self, out: Path) -> bool:
        return (self.directory(out) / "result.json").is_file()


def _check(ok: bool, key: str, value, must: str) -> None:
    if not ok:
        raise BenchmarkError(f"benchmark value {key}={value!r} is invalid: it must be {must}.")


def plan_cells(bench: DictConfig) -> list[Cell]:
    """Every cell of the grid, in a fixed order (tasks, then policies, then episodes, then seeds)."""
    tasks, policies = list(bench.tasks), OmegaConf.to_container(bench.policies)
    seeds, episodes = list(bench.seeds), list(bench.train_episodes)
    _check(bool(tasks) and all(isinstance(t, str) for t in tasks), "tasks", tasks, "a non-empty list of task config names")
    _check(isinstance(policies, dict) and any(e is not None for e in policies.values()), "policies", policies,
           "a non-empty mapping of policy config name -> list of overrides (null: left out)")
    variants = {}  # label -> (policy config, overrides)
    for label, entry in policies.items():
        if entry is None:  # a config built on another drops one of its policies by setting it to null
            continue
        config, overrides = (entry.get("policy"), entry.get("overrides", [])) if isinstance(entry, dict) else (label, entry)
        _check(isinstance(overrides, list) and all(isinstance(o, str) for o in overrides), f"policies.{label}", entry,
               "a list of override strings, or {policy: NAME, overrides: [...]}")
        _check(config in known_policies(), f"policies.{label}", entry, f"a policy config of conf/policy ({', '.join(known_policies())})")
        variants[label] = (config, tuple(overrides))
    _check(bool(seeds) and all(isinstance(s, int) and s >= 0 for s in seeds), "seeds", seeds, "a non-empty list of integers >= 0")
    _check(bool(episodes) and all(e is None or (isinstance(e, int) and e >= 1) for e in episodes), "train_episodes",
           episodes, "a non-empty list of positive integers or null (every episode)")
    _check(isinstance(bench.steps, int) and bench.steps >= 1, "steps", bench.steps, "a positive integer")
    known = {p.stem for p in (REPO / "conf" / "task").glob("*.yaml")}
    for task in tasks:
        _check(task in known, "tasks", task, f"one of the configs in conf/task ({', '.join(sorted(known))})")
    cells = []
    for task in tasks:
        for label, (config, overrides) in variants.items():
            for n in episodes:
                for seed in seeds:
                    cells.append(Cell(len(cells), task, label, overrides, int(seed), n, "" if config == label else config))
    return cells


def known_policies() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "policy").glob("*.yaml"))


def dataset_path(bench: DictConfig, task: str) -> str | None:
    """Where a task's demonstrations are: `dataset_dir/TASK.zarr`, or (null) the task's own path."""
    return None if bench.get("dataset_dir") is None else str(Path(bench.dataset_dir) / f"{task}.zarr")


def train_command(bench: DictConfig, cell: Cell, out: Path) -> list[str]:
    command = [sys.executable, str(REPO / "train.py"), f"task={cell.task}", f"policy={cell.policy_config or cell.policy}", f"seed={cell.seed}",
               f"training.steps={bench.steps}", f"hydra.run.dir={cell.directory(out)}"]
    if (path := dataset_path(bench, cell.task)) is not None:
        command.append(f"task.dataset_path={path}")
    if cell.train_episodes is not None:
        command.append(f"data.max_train_episodes={cell.train_episodes}")
    return command + list(bench.overrides) + list(cell.policy_overrides)


def code_version() -> str:
    """The commit, with `-dirty` when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'unknown CPU'}, {os.cpu_count()} CPUs"


def run_cell(bench: DictConfig, cell: Cell, out: Path) -> dict:
    """Run (or resume) one cell's train.py; on success write its result.json and return it."""
    directory = cell.directory(out)
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    started = time.time()
    with open(directory / "train.log", "a") as log:
        run = subprocess.run(train_command(bench, cell, out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(run.stdout)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        tail = (directory / "train.log").read_text().strip().splitlines()[-1:] or [f"exit code {run.returncode}"]
        raise RuntimeError(f"benchmark cell {cell.name} failed (exit code {run.returncode}): {tail[0]}")
    summary = {k: float(v) for k, v in (item.split("=", 1) for item in lines[-1].split())}
    curves = read_curves(directory / "metrics.jsonl")
    result = {"cell": cell.name, "index": cell.index, "task": cell.task, "policy": cell.policy,
              "policy_config": cell.policy_config or cell.policy,
              "policy_overrides": list(cell.policy_overrides), "seed": cell.seed, "train_episodes": cell.train_episodes,
              "steps": bench.steps, "wall_time_s": curves[-1]["elapsed_s"] if curves else time.time() - started,
              "code_version": code_version(), "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "metrics": summary}
    with replaced_atomically(directory / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


def read_curves(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per step (a resumed run logs some steps twice: the last wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        by_step[int(row["step"])] = {**by_step.get(int(row["step"]), {}), **row}
    return [by_step[step] for step in sorted(by_step)]
