"""Lazy chunked reads: the same samples, batches and training as in memory, with bounded memory."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
import pytest
import torch

import il_policies.data.layout as layout
from il_policies.data.dataset import SequenceDataset
from il_policies.data.lazy import ChunkCache, LazyArray
from il_policies.data.normalizer import Normalizer
from il_policies.data.store import StoreError, TrajectoryStore
from il_policies.training import Workspace
from il_policies.training.distributed import GlobalBatchOrder
from tests.conftest import make_cfg, write_linear_store

ROW_BYTES = 12 * 12 * 3
CHUNK_ROWS = 7  # small chunks, so windows cross chunk boundaries and the cache has to evict


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("lazy") / "chunked.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "CHUNK_TARGET_BYTES", CHUNK_ROWS * ROW_BYTES)
        write_linear_store(path, n_episodes=6, length=23, image_size=12)
    return str(path)


def datasets(path, **kwargs) -> tuple[SequenceDataset, SequenceDataset]:
    window = dict(n_obs_steps=3, horizon=4, action_offset=-1, val_ratio=0.2, seed=1) | kwargs
    return (SequenceDataset.from_store(path, in_memory=True, **window),
            SequenceDataset.from_store(path, in_memory=False, cache_mb=3 * CHUNK_ROWS * ROW_BYTES / 2**20, **window))


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["obs"].keys() == b["obs"].keys()
    for key in a["obs"]:
        np.testing.assert_array_equal(a["obs"][key], b["obs"][key])
    np.testing.assert_array_equal(a["action"], b["action"])
    np.testing.assert_array_equal(a["action_is_pad"], b["action_is_pad"])


def test_a_lazy_array_gathers_what_numpy_gathers_and_keeps_its_cache_in_budget(chunked_store):
    store = TrajectoryStore.open(chunked_store)
    whole = store.load(["image"])["image"]
    cache = ChunkCache(budget_bytes=2 * CHUNK_ROWS * ROW_BYTES)
    lazy = LazyArray(store, "image", cache)
    assert lazy.shape == whole.shape and lazy.chunk_rows == CHUNK_ROWS and len(lazy) == store.n_steps
    rows = np.random.default_rng(0).integers(-len(whole), len(whole), size=(9, 4))
    np.testing.assert_array_equal(lazy[rows], whole[rows])
    np.testing.assert_array_equal(lazy[5:30:3], whole[5:30:3])
    np.testing.assert_array_equal(lazy[np.arange(len(whole))], whole)  # every chunk in turn: the cache evicts
    assert cache.bytes <= cache.budget_bytes and cache.misses >= -(-len(whole) // CHUNK_ROWS)
    hits = cache.hits
    lazy[np.array([len(whole) - 1, len(whole) - 2])]  # the last chunk is still cached
    assert cache.hits == hits + 1
    with pytest.raises(IndexError):
        lazy[np.array([len(whole)])]


@pytest.mark.parametrize("order", ["random", "chunked"])
def test_lazy_and_in_memory_datasets_give_identical_batches(chunked_store, order):
    memory, lazy = datasets(chunked_store)
    assert memory.lazy_keys == [] and lazy.lazy_keys == ["image"]
    assert memory.chunk_rows == lazy.chunk_rows == CHUNK_ROWS
    blocks = lazy.sample_blocks() if order == "chunked" else None
    batches = GlobalBatchOrder(len(lazy), 8, seed=0, blocks=blocks, blocks_per_shuffle=2).iter_from(0)
    for _, indices in zip(range(3 * len(lazy) // 8), batches):  # three epochs
        assert_same_batch(lazy.__getitems__(indices), memory.__getitems__(indices))
    for a, b in zip(memory.get_validation_dataset(), lazy.get_validation_dataset()):
        assert_same_batch(a, b)


def test_the_normalizer_fitted_from_streamed_rows_equals_the_in_memory_fit(chunked_store):
    memory, lazy = datasets(chunked_store)
    fits = []
    for dataset in (memory, lazy):
        normalizer = Normalizer(dataset.shape_meta)
        normalizer.fit(dataset.fit_data())
        fits.append(normalizer.state_dict())
    for key, value in fits[0].items():
        torch.testing.assert_close(fits[1][key], value, rtol=1e-6, atol=1e-7, msg=key)
    # the fit's pass reads every chunk once through a cache of its own: the dataset's stays empty
    assert lazy.data["image"].cache.bytes == 0 and lazy.data["image"].cache.misses == 0


def test_in_memory_auto_loads_what_fits_the_budget(chunked_store):
    store = TrajectoryStore.open(chunked_store)
    needed = store.nbytes(["image", "state", "action"]) / 2**20
    fits = SequenceDataset.from_store(chunked_store, in_memory="auto", memory_budget_mb=needed)
    too_big = SequenceDataset.from_store(chunked_store, in_memory="auto", memory_budget_mb=needed * 0.99)
    assert fits.lazy_keys == [] and too_big.lazy_keys == ["image"]
    with pytest.raises(ValueError, match="in_memory must be"):
        SequenceDataset.from_store(chunked_store, in_memory="sometimes")


def test_the_chunk_aligned_order_is_a_permutation_that_resumes_exactly_and_stays_local(chunked_store):
    lazy = datasets(chunked_store)[1]
    blocks = lazy.sample_blocks()
    order = GlobalBatchOrder(len(lazy), 8, seed=3, blocks=blocks, blocks_per_shuffle=2)
    first, second = order.permutation(0), order.permutation(1)
    assert sorted(first) == list(range(len(lazy))) and not np.array_equal(first, second)
    # each block's samples lie in one run of 2 blocks: the stretch of the epoch they span holds <= 2 blocks
    position = np.argsort(first)
    for block in np.unique(blocks):
        where = position[blocks == block]
        assert len(np.unique(blocks[first[where.min() : where.max() + 1]])) <= 2
    steps = [b for _, b in zip(range(40), order.iter_from(0))]
    assert [b for _, b in zip(range(15), order.iter_from(25))] == steps[25:40]
    random_order = GlobalBatchOrder(len(lazy), 8, seed=3)
    distinct = lambda batches: np.mean([len(np.unique(blocks[b])) for b in batches])  # noqa: E731
    assert distinct(steps) < distinct([b for _, b in zip(range(40), random_order.iter_from(0))]) - 2


def test_a_pickled_lazy_array_carries_no_arrays_and_reopens_the_store(chunked_store):
    lazy = datasets(chunked_store)[1]
    lazy.__getitems__([0, 1, 2])  # something cached
    blob = pickle.dumps(lazy)
    assert len(pickle.dumps(lazy.data["image"])) < 1000 and len(blob) < lazy.data["image"].shape[0] * ROW_BYTES / 2
    clone = pickle.loads(blob)
    assert clone.data["image"].cache.bytes == 0
    assert_same_batch(clone.__getitems__([5, 40, 77]), lazy.__getitems__([5, 40, 77]))


_INHERITED = {}


def _read_in_forked_child():
    array = _INHERITED["array"]
    rows = array[np.arange(40, 60)]  # chunks the parent has not cached: the child reads the store
    return array._pid == os.getpid(), array._store is not _INHERITED["parent_store"], rows


def test_a_forked_worker_opens_the_store_itself(chunked_store):
    """A forked loader worker must not use its parent's open store: a remote one's HTTP session does not survive a fork."""
    array = datasets(chunked_store)[1].data["image"]
    array[np.arange(10)]  # the parent opens the store
    _INHERITED.update(array=array, parent_store=array._store)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        own_pid, reopened, rows = pool.apply(_read_in_forked_child)
    assert own_pid and reopened
    np.testing.assert_array_equal(rows, array[np.arange(40, 60)])


def test_a_corrupt_chunk_read_lazily_names_the_store_key_and_episode(tmp_path):
    path = tmp_path / "corrupt.zarr"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "CHUNK_TARGET_BYTES", CHUNK_ROWS * ROW_BYTES)
        write_linear_store(path, n_episodes=3, length=10, image_size=12)
    (path / "data/image/c/2/0/0/0").write_bytes(b"junk" * 20)  # steps 14-20: episodes 1-2
    lazy = SequenceDataset.from_store(path, in_memory=False, val_ratio=0)
    lazy.__getitems__([0, 1])  # chunk 0 is fine
    for windows in ([15], list(range(len(lazy)))):  # the bad chunk alone, or among all (read together by threads)
        with pytest.raises(StoreError) as error:
            lazy.__getitems__(windows)
        message = str(error.value)
        assert str(path) in message and "'image'" in message and "episodes 1-2" in message and "\n" not in message


@pytest.mark.parametrize("reading", [["data.in_memory=false", "data.batch_order=chunked", "data.num_workers=2"],
                                     ["data.in_memory=false", "data.batch_order=chunked", "data.num_workers=0"]],
                         ids=["lazy-2-workers", "lazy"])
def test_training_from_lazy_reads_equals_training_in_memory(chunked_store, tmp_path, reading):
    common = ["policy=bc", "policy.hidden_dims=[32]", f"task.dataset_path={chunked_store}", "training.steps=6",
              "training.batch_size=8", "data.chunks_per_shuffle=2", "eval.n_episodes=0"]
    memory = Workspace(make_cfg([*common, "data.in_memory=true", "data.batch_order=chunked"]), tmp_path / "memory")
    memory.run()
    lazy = Workspace(make_cfg([*common, *reading, "data.cache_mb=0.05"]), tmp_path / "lazy")
    lazy.run()
    assert lazy.dataset.lazy_keys == ["image"] and memory.dataset.lazy_keys == []
    for key, value in memory.policy.state_dict().items():
        torch.testing.assert_close(lazy.policy.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_lazy_run_interrupted_and_resumed_equals_an_uninterrupted_in_memory_run(chunked_store, tmp_path, monkeypatch):
    from tests.test_training import run_until_interrupted

    common = ["policy=bc", "policy.hidden_dims=[32]", "policy.dropout=0.1", f"task.dataset_path={chunked_store}",
              "training.steps=16", "training.batch_size=8", "data.batch_order=chunked", "data.chunks_per_shuffle=2", "eval.n_episodes=0"]
    straight = Workspace(make_cfg([*common, "data.in_memory=true"]), tmp_path / "straight")
    straight.run()
    lazy = [*common, "data.in_memory=false", "data.cache_mb=0.01"]
    run_until_interrupted(lazy, tmp_path / "lazy", 9, monkeypatch)  # mid-epoch: the order resumes inside it
    resumed = Workspace(make_cfg(lazy), tmp_path / "lazy")
    assert resumed.run()["step"] == 16
    for key, value in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[key], value, rtol=0, atol=0, msg=key)
