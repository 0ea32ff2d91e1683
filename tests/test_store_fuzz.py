"""Fuzzed stores: random schemas, episode lengths and corruptions. Opening, validating and sampling
either work or raise one StoreError sentence naming the store, never any other exception."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st

import il_policies.data.layout as layout
from il_policies.data.dataset import SequenceDataset
from il_policies.data.store import KeySpec, StoreError, TrajectoryStore

FLOAT_DTYPES = ["float32", "float64", "float16"]
INT_DTYPES = ["int16", "int32", "uint8", "bool"]


@st.composite
def schemas(draw):
    keys = {"state": KeySpec((draw(st.integers(1, 4)),), draw(st.sampled_from(FLOAT_DTYPES + INT_DTYPES)), "low_dim"),
            "action": KeySpec((draw(st.integers(1, 3)),), draw(st.sampled_from(FLOAT_DTYPES)), "action")}
    if draw(st.booleans()):
        keys["camera"] = KeySpec((draw(st.integers(1, 5)), draw(st.integers(1, 5)), 3), "uint8", "rgb")
    return keys


def random_episode(keys: dict[str, KeySpec], length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    episode = {}
    for name, spec in keys.items():
        if np.dtype(spec.dtype).kind == "f":
            episode[name] = rng.uniform(-5, 5, (length, *spec.shape)).astype(spec.dtype)
        elif spec.dtype == "bool":
            episode[name] = rng.random((length, *spec.shape)) < 0.5
        else:
            episode[name] = rng.integers(0, 100, (length, *spec.shape)).astype(spec.dtype)
    return episode


def _array_files(path):
    return sorted(p for p in (path / "data").rglob("c/*") if p.is_file()) + sorted((path / "meta").rglob("c/*"))


def _edit_attr(path, edit):
    meta_file = path / "zarr.json"
    doc = json.loads(meta_file.read_text())
    edit(doc["attributes"]["il_policies"])
    meta_file.write_text(json.dumps(doc))


CORRUPTIONS = {
    "none": lambda path, rng: None,
    "garbage_chunk": lambda path, rng: rng.choice(_array_files(path)).write_bytes(rng.bytes(int(rng.integers(0, 64)))),
    "truncated_chunk": lambda path, rng: (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]))(
        rng.choice(_array_files(path))),
    "lost_chunk": lambda path, rng: rng.choice(_array_files(path)).unlink(),
    "garbage_array_metadata": lambda path, rng: rng.choice(sorted((path / "data").glob("*/zarr.json"))).write_text("{"),
    "garbage_root_metadata": lambda path, rng: (path / "zarr.json").write_bytes(rng.bytes(20)),
    "ends_overwritten": lambda path, rng: _write_array(path / "meta/episode_ends", rng.integers(-3, 40, int(rng.integers(0, 5)))),
    "seeds_overwritten": lambda path, rng: _write_array(path / "meta/episode_seeds", rng.integers(0, 9, int(rng.integers(0, 5)))),
    "data_resized": lambda path, rng: _resize(rng.choice(sorted(p for p in (path / "data").iterdir() if p.is_dir())), int(rng.integers(0, 40))),
    "committed_episodes": lambda path, rng: _edit_attr(path, lambda m: m.update(
        committed_episodes=[-1, 99, "3", None, 1.5, True][int(rng.integers(0, 6))])),
    "committed_steps": lambda path, rng: _edit_attr(path, lambda m: m.update(
        committed_steps=[-1, 0, 7, "x", None][int(rng.integers(0, 5))])),
    "fps": lambda path, rng: _edit_attr(path, lambda m: m.update(fps=["fast", [], -1, None][int(rng.integers(0, 4))])),
    "schema_entry": lambda path, rng: _edit_attr(path, lambda m: m["keys"].update(
        action=[{"shape": "x"}, {"shape": [2], "dtype": "complex64", "kind": "action"}, 7,
                {"shape": [1, 2], "dtype": "float32", "kind": "action"}][int(rng.integers(0, 4))])),
    "keys_not_a_dict": lambda path, rng: _edit_attr(path, lambda m: m.update(keys=["state"])),
    "attribute_removed": lambda path, rng: _edit_attr(path, lambda m: m.pop(
        ["keys", "format_version", "committed_steps", "task", "provenance"][int(rng.integers(0, 5))])),
    "provenance": lambda path, rng: _edit_attr(path, lambda m: m.update(provenance=["text", 3, [1]][int(rng.integers(0, 3))])),
    "meta_removed": lambda path, rng: shutil.rmtree(path / "meta"),
    "nan_written": lambda path, rng: _write_nan(path),
}


def _write_array(path, values):
    if not path.exists():
        return
    a = zarr.open_array(str(path), mode="r+")
    a.resize((len(values),))
    a[:] = values


def _resize(path, n):
    a = zarr.open_array(str(path), mode="r+")
    a.resize((n, *a.shape[1:]))


def _write_nan(path):
    a = zarr.open_array(str(path / "data" / "action"), mode="r+")
    if a.shape[0]:
        a[a.shape[0] // 2] = np.nan


ALWAYS_REFUSED = {"garbage_array_metadata", "garbage_root_metadata", "keys_not_a_dict", "meta_removed", "schema_entry",
                  "nan_written"}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_TARGET_BYTES", 64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=schemas(), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       corruption=st.sampled_from(sorted(CORRUPTIONS)), seed=st.integers(0, 2**16), with_seeds=st.booleans())
def test_a_fuzzed_store_opens_and_samples_or_raises_one_store_error(tmp_path_factory, small_chunks, keys, lengths,
                                                                     corruption, seed, with_seeds):
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("fuzz") / "store.zarr"
    store = TrajectoryStore.create(path, keys, fps=10.0, task="fuzz")
    for i, length in enumerate(lengths):
        store.append_episode(random_episode(keys, length, rng), seed=i if with_seeds else None)
    CORRUPTIONS[corruption](path, rng)
    try:
        opened = TrajectoryStore.open(path)
        opened.validate()
        dataset = SequenceDataset.from_store(path, n_obs_steps=2, horizon=3, val_ratio=0.0)
        for i in range(len(dataset)):
            dataset[i]
    except StoreError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        return
    # these leave nothing readable to fall back on, so they cannot pass unnoticed
    assert corruption not in ALWAYS_REFUSED, f"{corruption} went unnoticed"
    if corruption == "none":
        assert opened.episode_lengths.tolist() == lengths
