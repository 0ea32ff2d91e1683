"""Shared fixtures. The stores built here are test fixtures with a known structure, not tasks."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import il_policies.training.config  # noqa: F401  (registers the structured configs with Hydra)
from il_policies.data.store import KeySpec, TrajectoryStore

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def write_linear_store(path: Path, n_episodes: int = 6, length: int = 40, image_size: int | None = None, seed: int = 0):
    """Episodes whose action is a fixed linear function of the state: learnable to near-zero loss."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(5, 3)).astype(np.float32)
    keys = {"state": KeySpec((5,), "float32", "low_dim"), "action": KeySpec((3,), "float32", "action")}
    if image_size:
        keys["image"] = KeySpec((image_size, image_size, 3), "uint8", "rgb")
    store = TrajectoryStore.create(path, keys, fps=10.0, task="test_fixture", provenance={"made_by": "tests"})
    for episode in range(n_episodes):
        state = np.cumsum(rng.normal(scale=0.3, size=(length, 5)), axis=0).astype(np.float32)
        data = {"state": state, "action": state @ weights}
        if image_size:
            data["image"] = rng.integers(0, 256, size=(length, image_size, image_size, 3), dtype=np.uint8)
        store.append_episode(data, seed=episode)
    return store


@pytest.fixture(scope="session")
def linear_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "linear.zarr"
    write_linear_store(path)
    return path


@pytest.fixture(scope="session")
def image_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "image.zarr"
    write_linear_store(path, n_episodes=4, length=20, image_size=24)
    return path


def make_cfg(overrides: list[str]):
    """The train.py config with `overrides`; on a plain fixture store (task=dataset) unless a task is named."""
    task = [] if any(o.startswith("task=") for o in overrides) else ["task=dataset"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["logger.mode=disabled", "device=cpu", *task, *overrides])
