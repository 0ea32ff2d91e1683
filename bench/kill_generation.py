"""kill -9 during demonstration generation, at random instants: does every store open, and is every
episode that was complete before the kill still there, equal to what an uninterrupted run writes?

    MUJOCO_GL=egl python bench/kill_generation.py [--task metaworld_reach] [--episodes 30] [--kills 50]

1. An uninterrupted `datasets/generate.py` run writes the reference store (and gives the run time T).
2. Then, over and over: the same command on a second path, killed with SIGKILL after a delay drawn
   uniformly from [0, T] (start-up, store creation and appends alike). After each kill the store
   must open (or not exist yet), hold a prefix of the reference episodes (every key and seed equal),
   and hold at least as many episodes as before the kill. The next run continues it; once a run
   completes it, the store must equal the reference (data, seeds, provenance) and is deleted, and
   the cycle starts again.
Prints the counts (kills, unreadable stores, lost episodes, kills that cut an append short) with
the CPU model. Run by hand; the README's reliability section quotes it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from il_policies.data.store import StoreError, TrajectoryStore  # noqa: E402
from workers import cpu_model  # noqa: E402  (bench/workers.py)


def generate(task: str, n: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "WANDB_MODE": "disabled"}
    with open(out.parent / "stderr.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "datasets/generate.py", f"task={task}", f"n_episodes={n}", f"output={out}",
                                 f"hydra.run.dir={out.parent / 'hydra'}"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)


def prefix_problem(store: TrajectoryStore, reference: TrajectoryStore) -> str | None:
    """Why `store` is not a prefix of `reference`, or None."""
    if store.n_episodes > reference.n_episodes:
        return f"{store.n_episodes} episodes, more than the reference's {reference.n_episodes}"
    if store.n_episodes and store.episode_seeds.tolist() != reference.episode_seeds[: store.n_episodes].tolist():
        return "its seeds differ from the reference's"
    for i in range(store.n_episodes):
        ours, theirs = store.episode(i), reference.episode(i)
        for key, value in theirs.items():
            if not np.array_equal(ours[key], value):
                return f"episode {i} key {key!r} differs from the reference"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="metaworld_reach")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    cpu = cpu_model()
    work = Path(tempfile.mkdtemp(prefix="kill_generation_"))
    try:
        started = time.monotonic()
        ref_run = generate(args.task, args.episodes, work / "reference.zarr")
        if ref_run.wait() != 0:
            sys.exit(f"the reference run failed: {(work / 'stderr.log').read_text()[-2000:]}")
        run_time = time.monotonic() - started
        reference = TrajectoryStore.open(work / "reference.zarr")
        print(f"{cpu}; reference: {reference.n_episodes} episodes of {args.task} in {run_time:.1f} s")

        path = work / "killed.zarr"
        kills = unreadable = lost = torn = bad_prefix = cycles = mismatched_complete = before = 0
        while kills < args.kills:
            proc = generate(args.task, args.episodes, path)
            delay = rng.uniform(0.0, run_time)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                kills += 1
            if not path.exists():
                continue
            try:
                store = TrajectoryStore.open(path)
            except StoreError as error:
                unreadable += 1
                print(f"kill {kills}: unreadable store: {error}")
                shutil.rmtree(path)
                before = 0
                continue
            torn += store.has_uncommitted_tail
            lost += max(0, before - store.n_episodes)
            if (why := prefix_problem(store, reference)) is not None:
                bad_prefix += 1
                print(f"kill {kills}: {why}")
            before = store.n_episodes
            if proc.returncode == 0 or store.provenance.get("complete"):
                cycles += 1
                same = (store.n_episodes == reference.n_episodes and store.provenance == reference.provenance
                        and prefix_problem(store, reference) is None)
                mismatched_complete += not same
                shutil.rmtree(path)
                before = 0
        print(f"kills: {kills}  unreadable stores: {unreadable}  lost complete episodes: {lost}  "
              f"stores not a prefix of the reference: {bad_prefix}  kills that cut an append short: {torn}  "
              f"completed generations: {cycles} (not equal to the reference: {mismatched_complete})")
        return int(bool(unreadable or lost or bad_prefix or mismatched_complete))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
