"""Append deterministic episodes to a store until it holds N (`python -m tests.store_writer PATH N`).

tests/test_store_crash.py kills this process with SIGKILL at random instants and checks what is left.
Episode i depends on i only, so the test knows what every committed episode must hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import il_policies.data.layout as layout
from il_policies.data.store import KeySpec, TrajectoryStore

KEYS = {"state": KeySpec((5,), "float32", "low_dim"),
        "image": KeySpec((6, 6, 3), "uint8", "rgb"),
        "action": KeySpec((2,), "float32", "action")}


def episode(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    length = int(rng.integers(1, 30))
    return {"state": rng.standard_normal((length, 5)).astype(np.float32),
            "image": rng.integers(0, 256, (length, 6, 6, 3), dtype=np.uint8),
            "action": rng.uniform(-1, 1, (length, 2)).astype(np.float32)}


def main(path: Path, n: int) -> None:
    store = (TrajectoryStore.open(path, mode="a") if path.exists()
             else TrajectoryStore.create(path, KEYS, fps=10.0, task="crash_test"))
    print("ready", flush=True)
    while store.n_episodes < n:
        i = store.n_episodes
        store.append_episode(episode(i), seed=1000 + i, provenance={"episodes_written": i + 1})


if __name__ == "__main__":
    layout.CHUNK_TARGET_BYTES = 512  # small chunks: episodes straddle chunk boundaries, appends rewrite chunks
    main(Path(sys.argv[1]), int(sys.argv[2]))
