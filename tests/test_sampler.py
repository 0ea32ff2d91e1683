"""Tests for il_policies.data.sampler and il_policies.data.dataset."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from il_policies.data.dataset import SequenceDataset, collate_batch, prepare_batch
from il_policies.data.sampler import SequenceSampler, split_episodes

torch.set_num_threads(1)


# ---------------------------------------------------------------- sampler


@st.composite
def sampler_cases(draw):
    lengths = draw(st.lists(st.integers(1, 30), min_size=1, max_size=6))
    n_eps = len(lengths)
    ids = draw(st.lists(st.integers(0, n_eps - 1), min_size=1, max_size=n_eps, unique=True))
    n_obs = draw(st.integers(1, 4))
    horizon = draw(st.integers(1, 12))
    offset = draw(st.sampled_from([-(n_obs - 1), 0]))
    return lengths, sorted(ids), n_obs, horizon, offset


@settings(max_examples=150, deadline=None)
@given(sampler_cases())
def test_sampler_windows_property(case):
    lengths, ids, n_obs, horizon, offset = case
    ends = np.cumsum(lengths).astype(np.int64)
    starts = ends - np.asarray(lengths)
    s = SequenceSampler(ends, np.asarray(ids), n_obs, horizon, offset)

    assert len(s) == sum(lengths[e] for e in ids)
    assert s.obs_indices.shape == (len(s), n_obs) and s.obs_indices.dtype == np.int64
    assert s.action_indices.shape == (len(s), horizon) and s.action_indices.dtype == np.int64
    assert s.action_is_pad.shape == (len(s), horizon) and s.action_is_pad.dtype == np.bool_

    seen = set()
    for i in range(len(s)):
        ep, t = int(s.sample_episode[i]), int(s.sample_step[i])
        start, end = int(starts[ep]), int(ends[ep])
        assert ep in ids and 0 <= t < end - start
        seen.add((ep, t))
        cur = start + t
        # No window crosses its episode.
        assert np.all((s.obs_indices[i] >= start) & (s.obs_indices[i] < end))
        assert np.all((s.action_indices[i] >= start) & (s.action_indices[i] < end))
        # Obs: clamped window ending at the current step.
        obs_raw = np.arange(cur - n_obs + 1, cur + 1)
        np.testing.assert_array_equal(s.obs_indices[i], np.clip(obs_raw, start, end - 1))
        assert s.obs_indices[i, -1] == cur
        # Actions: pad exactly outside the episode, padded entries at the edge.
        act_raw = np.arange(cur + offset, cur + offset + horizon)
        outside = (act_raw < start) | (act_raw >= end)
        np.testing.assert_array_equal(s.action_is_pad[i], outside)
        np.testing.assert_array_equal(s.action_indices[i][~outside], act_raw[~outside])
        assert np.all(s.action_indices[i][act_raw < start] == start)
        assert np.all(s.action_indices[i][act_raw >= end] == end - 1)
    # Every timestep of every selected episode is the current step exactly once.
    assert len(seen) == len(s)
    assert seen == {(e, t) for e in ids for t in range(lengths[e])}


def test_sampler_concrete_example():
    # Episodes [0, 3) and [3, 5).
    s = SequenceSampler(np.array([3, 5]), np.array([0, 1]), n_obs_steps=2, horizon=3)
    np.testing.assert_array_equal(s.obs_indices, [[0, 0], [0, 1], [1, 2], [3, 3], [3, 4]])
    np.testing.assert_array_equal(
        s.action_indices, [[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 4], [4, 4, 4]]
    )
    np.testing.assert_array_equal(s.action_is_pad[1], [False, False, True])
    np.testing.assert_array_equal(s.sample_episode, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(s.sample_step, [0, 1, 2, 0, 1])


def test_sampler_bad_args():
    with pytest.raises(ValueError, match="n_obs_steps"):
        SequenceSampler(np.array([3]), np.array([0]), 0, 1)
    with pytest.raises(ValueError, match="episode_ids"):
        SequenceSampler(np.array([3]), np.array([1]), 1, 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        SequenceSampler(np.array([3, 2]), np.array([0]), 1, 1)


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("n,ratio", [(1, 0.1), (2, 0.1), (10, 0.1), (10, 0.95), (40, 0.25), (5, 0.0)])
def test_split_disjoint_covering(n, ratio):
    train, val = split_episodes(n, ratio, seed=3)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert len(train) >= 1
    expected_val = min(max(round(n * ratio), 1 if (ratio > 0 and n > 1) else 0), n - 1)
    assert len(val) == expected_val


def test_split_seeded():
    a = split_episodes(50, 0.2, seed=7)
    b = split_episodes(50, 0.2, seed=7)
    c = split_episodes(50, 0.2, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_max_train_episodes():
    full_train, val = split_episodes(50, 0.1, seed=0)
    train8, val8 = split_episodes(50, 0.1, seed=0, max_train_episodes=8)
    assert len(train8) == 8
    assert set(train8) <= set(full_train)
    np.testing.assert_array_equal(val, val8)  # val does not depend on the subsampling
    np.testing.assert_array_equal(train8, split_episodes(50, 0.1, 0, max_train_episodes=8)[0])


def test_split_errors():
    with pytest.raises(ValueError, match="max_train_episodes=10 is more than the 9 train"):
        split_episodes(10, 0.1, seed=0, max_train_episodes=10)
    with pytest.raises(ValueError, match="at least 1 episode"):
        split_episodes(0, 0.1, seed=0)
    with pytest.raises(ValueError, match="val_ratio"):
        split_episodes(10, 1.5, seed=0)


# ---------------------------------------------------------------- dataset

LENGTHS = [5, 7, 4, 6, 3, 8, 5, 6, 4, 7]
H, W, C, A, D = 6, 5, 3, 2, 4


def make_data(lengths=LENGTHS):
    ends = np.cumsum(lengths).astype(np.int64)
    n = int(ends[-1])
    rng = np.random.default_rng(0)
    data = {
        "state": np.arange(n * D, dtype=np.float64).reshape(n, D),
        "image": rng.integers(0, 256, size=(n, H, W, C), dtype=np.uint8),
        "action": np.arange(n * A, dtype=np.float64).reshape(n, A),
    }
    keys = {
        "state": SimpleNamespace(shape=(D,), dtype="float64", kind="low_dim"),
        "image": SimpleNamespace(shape=(H, W, C), dtype="uint8", kind="rgb"),
        "action": SimpleNamespace(shape=(A,), dtype="float64", kind="action"),
    }
    return data, ends, keys


def make_ds(**kw):
    data, ends, keys = make_data()
    kw = {"n_obs_steps": 2, "horizon": 4, "val_ratio": 0.2, "seed": 1, **kw}
    return SequenceDataset(data, ends, keys, "action", **kw)


def test_dataset_getitem_matches_getitems_and_raw_data():
    ds = make_ds()
    data, _, _ = make_data()
    assert ds.obs_keys == ["state", "image"] and ds.action_key == "action"
    idx = [0, 5, len(ds) - 1, 3]
    batch = ds.__getitems__(idx)
    for b, i in enumerate(idx):
        item = ds[i]
        for k in ds.obs_keys:
            np.testing.assert_array_equal(batch["obs"][k][b], item["obs"][k])
        np.testing.assert_array_equal(batch["action"][b], item["action"])
        np.testing.assert_array_equal(batch["action_is_pad"][b], item["action_is_pad"])
        s = ds.sampler
        np.testing.assert_array_equal(item["obs"]["image"], data["image"][s.obs_indices[i]])
        np.testing.assert_array_equal(item["action"], data["action"][s.action_indices[i]])
    assert batch["obs"]["image"].shape == (4, 2, H, W, C)
    assert batch["obs"]["image"].dtype == np.uint8
    assert batch["obs"]["state"].dtype == np.float32
    assert batch["action"].shape == (4, 4, A) and batch["action"].dtype == np.float32
    assert batch["action_is_pad"].dtype == np.bool_
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_shape_meta():
    assert make_ds().shape_meta == {
        "obs": {"state": {"shape": (D,), "kind": "low_dim"},
                "image": {"shape": (C, H, W), "kind": "rgb"}},
        "action": {"shape": (A,)},
    }


def test_dataloader_routes_through_getitems(monkeypatch):
    ds = make_ds()
    calls = []
    orig = SequenceDataset.__getitems__

    def spy(self, indices):
        calls.append(list(indices))
        return orig(self, indices)

    monkeypatch.setattr(SequenceDataset, "__getitems__", spy)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True,
                                         collate_fn=collate_batch, num_workers=0)
    batch = next(iter(loader))
    assert calls and len(calls[0]) == 8
    assert batch["obs"]["image"].shape == (8, 2, H, W, C)
    assert batch["obs"]["image"].dtype == torch.uint8
    assert batch["obs"]["state"].shape == (8, 2, D)
    assert batch["obs"]["state"].dtype == torch.float32
    assert batch["action"].shape == (8, 4, A) and batch["action"].dtype == torch.float32
    assert batch["action_is_pad"].shape == (8, 4) and batch["action_is_pad"].dtype == torch.bool
    # A list of single samples (no __getitems__) collates to the same thing.
    stacked = collate_batch([ds[i] for i in calls[0]])
    assert torch.equal(stacked["obs"]["image"], batch["obs"]["image"])


def test_prepare_batch():
    ds = make_ds()
    batch = collate_batch(ds.__getitems__([0, 1, 2]))
    out = prepare_batch(batch, ds.shape_meta, torch.device("cpu"))
    img = out["obs"]["image"]
    assert img.shape == (3, 2, C, H, W) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    raw = batch["obs"]["image"]
    assert torch.allclose(img, raw.permute(0, 1, 4, 2, 3).float() / 255)
    assert out["obs"]["state"].dtype == torch.float32
    assert out["action_is_pad"].dtype == torch.bool
    # Float images (e.g. from a robot) are laid out CHW but not rescaled.
    robot = {"obs": {"image": torch.full((1, 1, H, W, C), 0.5, dtype=torch.float64),
                     "state": torch.zeros(1, 1, D, dtype=torch.float64)}}
    out = prepare_batch(robot, ds.shape_meta, "cpu")
    assert out["obs"]["image"].shape == (1, 1, C, H, W)
    assert out["obs"]["image"].dtype == torch.float32
    assert torch.allclose(out["obs"]["image"], torch.tensor(0.5))
    assert out["obs"]["state"].dtype == torch.float32


def test_val_dataset_uses_val_episodes_only():
    ds = make_ds()
    val = ds.get_validation_dataset()
    assert val.split == "val"
    np.testing.assert_array_equal(val.episode_ids, ds.val_episode_ids)
    np.testing.assert_array_equal(np.unique(val.sampler.sample_episode), ds.val_episode_ids)
    assert set(np.unique(ds.sampler.sample_episode)).isdisjoint(ds.val_episode_ids)
    assert len(val) == sum(LENGTHS[e] for e in ds.val_episode_ids)
    assert val.data["image"] is ds.data["image"]  # no copy


def test_fit_data_only_train_steps():
    ds = make_ds(max_train_episodes=3)
    fit = ds.get_validation_dataset().fit_data()  # train episodes even from the val split
    ends = np.cumsum(LENGTHS)
    steps = np.concatenate([np.arange(ends[e] - LENGTHS[e], ends[e]) for e in ds.train_episode_ids])
    assert set(fit) == {"state", "image", "action"}
    assert fit["image"].dtype == np.uint8 and fit["image"].shape[1:] == (H, W, C)
    data, _, _ = make_data()
    for k in fit:
        np.testing.assert_array_equal(fit[k], data[k][steps])


def test_bad_input_names_source_and_key():
    data, ends, keys = make_data()
    del data["state"]
    with pytest.raises(ValueError, match=r"/tmp/x\.zarr.*'state'.*missing"):
        SequenceDataset(data, ends, keys, "action", source="/tmp/x.zarr")
    data, ends, keys = make_data()
    data["image"] = data["image"][:, :, :4]
    with pytest.raises(ValueError, match=r"/tmp/x\.zarr.*'image'.*per-step shape"):
        SequenceDataset(data, ends, keys, "action", source="/tmp/x.zarr")


def test_from_store_uses_store_keys(monkeypatch):
    import sys
    import types

    data, ends, keys = make_data()
    loaded = []

    class FakeStore:
        @classmethod
        def open(cls, path):
            st_ = cls()
            st_.keys, st_.action_key, st_.obs_keys, st_.episode_ends = keys, "action", ["image"], ends
            return st_

        def load(self, keys=None):
            loaded.append(list(keys))
            return {k: data[k] for k in keys}

        def nbytes(self, keys):
            return sum(data[k].nbytes for k in keys)

        def chunk_rows(self, key):
            return 4

    monkeypatch.setitem(sys.modules, "il_policies.data.store",
                        types.SimpleNamespace(TrajectoryStore=FakeStore))
    ds = SequenceDataset.from_store("/d/demo.zarr", horizon=3, val_ratio=0.2)
    assert loaded == [["image", "action"]]
    assert ds.obs_keys == ["image"] and ds.source == "/d/demo.zarr"
    assert ds[0]["action"].shape == (3, A)
    with pytest.raises(ValueError, match=r"/d/demo\.zarr.*'nope'"):
        SequenceDataset.from_store("/d/demo.zarr", obs_keys=["nope"])
