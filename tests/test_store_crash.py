"""A store survives its writer being killed at any instant: it always opens, holds a prefix of the
episodes written (each equal to what was written), and the next writer continues it."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from il_policies.data.store import TrajectoryStore
from tests.store_writer import episode

REPO = Path(__file__).resolve().parents[1]
N_KILLS, TIME_LIMIT_S = 20, 90


def writer(path: Path, n: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.store_writer", str(path), str(n)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)


def assert_prefix_of_written_episodes(store: TrajectoryStore) -> None:
    for i in range(store.n_episodes):
        for key, value in episode(i).items():
            np.testing.assert_array_equal(store.episode(i)[key], value, err_msg=f"episode {i} key {key}")
    if store.n_episodes:
        assert store.episode_seeds.tolist() == [1000 + i for i in range(store.n_episodes)]
        # provenance committed with an episode always describes exactly the visible episodes
        assert store.provenance["episodes_written"] == store.n_episodes


def test_sigkill_at_random_instants_loses_no_committed_episode(tmp_path):
    path, rng = tmp_path / "crash.zarr", random.Random(0)
    counts, torn, started = [], 0, time.monotonic()
    while len(counts) < N_KILLS and time.monotonic() - started < TIME_LIMIT_S:
        proc = writer(path, 100_000)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.2))
        proc.kill()
        proc.wait()
        if not path.exists():  # killed before the first create finished: nothing was committed
            assert not counts or counts[-1] == 0
            counts.append(0)
            continue
        store = TrajectoryStore.open(path)
        torn += store.has_uncommitted_tail
        assert_prefix_of_written_episodes(store)
        counts.append(store.n_episodes)
    assert len(counts) >= 10, f"only {len(counts)} kills in {TIME_LIMIT_S} s"
    assert counts == sorted(counts), f"a kill lost committed episodes: counts after each kill {counts}"
    assert counts[-1] > counts[0] and torn >= 1, (counts, torn)  # appends were interrupted mid-way
    final = writer(path, counts[-1] + 3)
    assert final.wait(timeout=60) == 0
    store = TrajectoryStore.open(path)
    assert store.n_episodes == counts[-1] + 3 and not store.has_uncommitted_tail
    store.validate()
    assert_prefix_of_written_episodes(store)
    assert not list(path.rglob("*.partial")), "zarr's temporary files are cleaned up by the next writer"


def test_an_append_cut_short_before_its_commit_is_ignored_then_trimmed(tmp_path):
    """The state the issue found torn: data grown and episode_ends resized (a zero at its end), the
    commit not written. It opens with the committed episodes; the next append replaces the tail."""
    from tests.store_writer import KEYS, main

    path = tmp_path / "torn.zarr"
    store = TrajectoryStore.create(path, KEYS, fps=10.0, task="crash_test")
    for i in range(3):
        store.append_episode(episode(i), seed=1000 + i, provenance={"episodes_written": i + 1})
    group = zarr.open_group(str(path), mode="r+")
    for name, arr in group["data"].arrays():
        arr.resize((arr.shape[0] + 7, *arr.shape[1:]))
    group["meta/episode_ends"].resize((4,))
    group["meta/episode_seeds"].resize((4,))
    torn = TrajectoryStore.open(path)
    assert torn.n_episodes == 3 and torn.has_uncommitted_tail
    assert_prefix_of_written_episodes(torn)
    main(path, 5)
    healed = TrajectoryStore.open(path)
    assert healed.n_episodes == 5 and not healed.has_uncommitted_tail
    assert zarr.open_group(str(path), mode="r")["meta/episode_ends"].shape == (5,)
    healed.validate()
    assert_prefix_of_written_episodes(healed)
