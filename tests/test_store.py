"""Tests for il_policies.data.store (TrajectoryStore) and the inspect CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import given, settings, strategies as st

import il_policies.data.layout as layout
from il_policies.data.inspect import main as inspect_main
from il_policies.data.store import KeySpec, StoreError, TrajectoryStore

REPO = Path(__file__).resolve().parents[1]
IMG = (8, 8, 3)
KEYS = {"state": KeySpec((39,), "float32", "low_dim"),
        "image": KeySpec(IMG, "uint8", "rgb"),
        "action": KeySpec((4,), "float32", "action")}
LENGTHS = (5, 40, 12)  # ends 5, 45, 57


def make_episode(length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"state": rng.standard_normal((length, 39)).astype(np.float32),
            "image": rng.integers(0, 256, (length, *IMG), dtype=np.uint8),
            "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32)}


@pytest.fixture
def small_chunks(monkeypatch):
    # 21 image rows / 26 state rows per chunk, so episodes span several chunks
    monkeypatch.setattr(layout, "CHUNK_TARGET_BYTES", 4096)


@pytest.fixture
def good(tmp_path, small_chunks):
    """A 3-episode store; returns (path, episodes)."""
    path = tmp_path / "good.zarr"
    rng = np.random.default_rng(0)
    s = TrajectoryStore.create(path, KEYS, fps=80.0, task="metaworld_push", provenance={"by": "test", "n": 3})
    episodes = [make_episode(n, rng) for n in LENGTHS]
    for i, ep in enumerate(episodes):
        s.append_episode(ep, seed=100 + i)
    return path, episodes


def raw_lengths(path) -> dict[str, int]:
    g = zarr.open_group(str(path), mode="r")
    out = {k: a.shape[0] for k, a in g["data"].arrays()}
    out["episode_ends"] = g["meta/episode_ends"].shape[0]
    return out


def assert_one_sentence(err: StoreError, path, *words):
    msg = str(err)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


# ---------------------------------------------------------------------------------------- round trip
def test_round_trip(good):
    path, episodes = good
    s = TrajectoryStore.open(path)
    assert (s.n_episodes, s.n_steps) == (3, 57)
    assert s.episode_ends.tolist() == [5, 45, 57] and s.episode_ends.dtype == np.int64
    assert s.episode_lengths.tolist() == list(LENGTHS)
    assert s.episode_seeds.tolist() == [100, 101, 102]
    assert s.action_key == "action" and s.obs_keys == ["image", "state"]
    assert s.keys == KEYS and (s.fps, s.task) == (80.0, "metaworld_push")
    assert s.provenance == {"by": "test", "n": 3}
    for i, ep in enumerate(episodes):
        got = s.episode(i)
        assert set(got) == set(KEYS)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], ep[k])
            assert got[k].dtype == np.dtype(KEYS[k].dtype)
    np.testing.assert_array_equal(s.episode(-1)["state"], episodes[-1]["state"])
    full = s.load()
    for k in KEYS:
        np.testing.assert_array_equal(full[k], np.concatenate([e[k] for e in episodes]))
    assert list(s.load(["action"])) == ["action"]
    s.validate()
    # the raw zarr layout is the documented one
    g = zarr.open_group(str(path), mode="r")
    assert g.metadata.zarr_format == 3
    meta = g.attrs["il_policies"]
    assert meta["format_version"] == 1 and meta["task"] == "metaworld_push" and meta["fps"] == 80.0
    assert meta["keys"]["image"] == {"shape": [8, 8, 3], "dtype": "uint8", "kind": "rgb"}
    assert g["meta/episode_seeds"][:].tolist() == [100, 101, 102]
    for k in KEYS:
        (codec,) = g[f"data/{k}"].compressors
        assert isinstance(codec, zarr.codecs.BloscCodec) and codec.cname.value == "zstd"
        assert g[f"data/{k}"].chunks[1:] == KEYS[k].shape  # chunks hold whole steps


def test_default_chunking_and_casting(tmp_path):
    keys = {"image": KeySpec((84, 84, 3), "uint8", "rgb"), "state": KeySpec((39,), "float32", "low_dim"),
            "action": KeySpec((4,), "float32", "action")}
    s = TrajectoryStore.create(tmp_path / "s.zarr", keys, fps=10, task="t")
    ep = {"image": np.zeros((3, 84, 84, 3), np.uint8), "state": np.ones((3, 39), np.float64),
          "action": np.arange(12, dtype=np.int64).reshape(3, 4)}
    s.append_episode(ep)  # float64 / int64 into float32 keys is a safe cast
    r = TrajectoryStore.open(tmp_path / "s.zarr")
    assert r.episode_seeds is None
    got = r.episode(0)
    assert got["state"].dtype == np.float32 and got["action"].tolist() == ep["action"].tolist()
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    img_chunk_mb = g["data/image"].chunks[0] * 84 * 84 * 3 / 2**20
    assert 1 <= img_chunk_mb <= 4 and 1000 <= g["data/state"].chunks[0] <= 8192
    r.validate()  # all-zero chunks were still written, so no chunk looks lost


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4))
def test_round_trip_property(tmp_path_factory, lengths):
    path = tmp_path_factory.mktemp("h") / "h.zarr"
    keys = {"obs": KeySpec((2,), "float32", "low_dim"), "act": KeySpec((), "int64", "action")}
    s = TrajectoryStore.create(path, keys, fps=5, task="t")
    eps = [{"obs": np.full((n, 2), i, np.float32), "act": np.arange(n)} for i, n in enumerate(lengths)]
    for ep in eps:
        s.append_episode(ep)
    r = TrajectoryStore.open(path)
    assert r.episode_lengths.tolist() == lengths and r.episode_ends[-1] == sum(lengths)
    for i, ep in enumerate(eps):
        np.testing.assert_array_equal(r.episode(i)["act"], ep["act"])


# ---------------------------------------------------------------------------------------- zarr v2
def write_v2_store(path, lengths=(3, 4)):
    """What diffusion_policy's ReplayBuffer writes: zarr v2, numcodecs Blosc, no schema attrs."""
    rng = np.random.default_rng(1)
    n = sum(lengths)
    data = {"img": rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8),
            "state": rng.standard_normal((n, 2)).astype(np.float32),
            "action": rng.standard_normal((n, 2)).astype(np.float32)}
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
    for k, v in data.items():
        g.require_group("data").create_array(k, shape=v.shape, chunks=(4, *v.shape[1:]), dtype=v.dtype,
                                             compressors=blosc)[:] = v
    g.require_group("meta").create_array("episode_ends", shape=(len(lengths),), dtype="int64",
                                         compressors=blosc)[:] = np.cumsum(lengths)
    return data


def test_read_zarr_v2_diffusion_policy_store(tmp_path, capsys):
    path = tmp_path / "dp.zarr"
    data = write_v2_store(path)
    assert (path / ".zgroup").exists() and not (path / "zarr.json").exists()
    s = TrajectoryStore.open(path)
    assert s.zarr_format == 2 and s.schema_inferred
    assert {k: v.kind for k, v in s.keys.items()} == {"img": "rgb", "state": "low_dim", "action": "action"}
    assert s.keys["img"].shape == (6, 5, 3) and (s.fps, s.task, s.episode_seeds) == (None, None, None)
    assert s.episode_lengths.tolist() == [3, 4]
    np.testing.assert_array_equal(s.episode(1)["img"], data["img"][3:])
    np.testing.assert_array_equal(s.load()["state"], data["state"])
    s.validate()
    assert inspect_main([str(path)]) == 0
    assert "zarr v2" in capsys.readouterr().out
    # appending keeps the v2 store readable
    a = TrajectoryStore.open(path, mode="a")
    a.append_episode({k: v[:2] for k, v in data.items()})
    assert TrajectoryStore.open(path).episode_lengths.tolist() == [3, 4, 2]


def test_v2_store_without_action_is_refused(tmp_path):
    path = tmp_path / "dp.zarr"
    write_v2_store(path)
    shutil.rmtree(path / "data" / "action")
    with pytest.raises(StoreError) as e:
        TrajectoryStore.open(path)
    assert_one_sentence(e.value, path, "'action'")


# ---------------------------------------------------------------------------------------- bad appends
def _bad(mutate):
    def make(rng):
        ep = make_episode(6, rng)
        mutate(ep)
        return ep
    return make


def _nan(ep):
    ep["action"][3, 1] = np.nan


BAD_EPISODES = {
    "lengths": (_bad(lambda ep: ep.update(action=ep["action"][:5])), "action"),
    "shape": (_bad(lambda ep: ep.update(state=ep["state"][:, :38])), "state"),
    "broadcastable_shape": (_bad(lambda ep: ep.update(action=ep["action"][:, :1])), "action"),  # (N, 1) for (4,)
    "flat_action": (_bad(lambda ep: ep.update(action=ep["action"][:, 0])), "action"),
    "dtype": (_bad(lambda ep: ep.update(image=ep["image"].astype(np.int64))), "image"),
    "float_image": (_bad(lambda ep: ep.update(image=ep["image"].astype(np.float32))), "image"),
    "unknown": (_bad(lambda ep: ep.update(reward=np.zeros(6))), "reward"),
    "missing": (_bad(lambda ep: ep.pop("state")), "state"),
    "nan": (_bad(_nan), "action"),
    "inf": (_bad(lambda ep: ep["state"].__setitem__((0, 0), np.inf)), "state"),
    "overflow": (_bad(lambda ep: ep.update(action=ep["action"].astype(np.float64) * 1e300)), "action"),
    "empty": (_bad(lambda ep: ep.update({k: v[:0] for k, v in ep.items()})), "state"),
}


@pytest.mark.parametrize("case", sorted(BAD_EPISODES))
def test_bad_append_is_refused_and_changes_nothing(good, case):
    path, _ = good
    make, key = BAD_EPISODES[case]
    before = raw_lengths(path)
    s = TrajectoryStore.open(path, mode="a")
    with pytest.raises(StoreError) as e:
        s.append_episode(make(np.random.default_rng(2)), seed=7)
    assert_one_sentence(e.value, path, f"'{key}'", "episode 3")
    assert s.n_episodes == 3 and raw_lengths(path) == before
    assert TrajectoryStore.open(path).n_steps == 57


def test_append_episodes_is_one_commit_equal_to_single_appends(tmp_path, small_chunks):
    rng = np.random.default_rng(5)
    episodes = [make_episode(n, rng) for n in (3, 30, 7)]
    one, many = (TrajectoryStore.create(tmp_path / f"{name}.zarr", KEYS, fps=10, task="t") for name in ("one", "many"))
    for i, ep in enumerate(episodes):
        one.append_episode(ep, seed=i)
    many.append_episodes(episodes, seeds=[0, 1, 2], provenance={"batch": 1})
    a, b = TrajectoryStore.open(tmp_path / "one.zarr"), TrajectoryStore.open(tmp_path / "many.zarr")
    assert b.episode_lengths.tolist() == [3, 30, 7] and b.episode_seeds.tolist() == [0, 1, 2]
    assert b.provenance == {"batch": 1}
    for key, value in a.load().items():
        np.testing.assert_array_equal(b.load()[key], value, err_msg=key)
    bad = [make_episode(4, rng), {**make_episode(4, rng), "action": np.zeros((4, 3), np.float32)}]
    with pytest.raises(StoreError) as e:
        many.append_episodes(bad, seeds=[3, 4])
    assert_one_sentence(e.value, tmp_path / "many.zarr", "'action'", "episode 4")
    assert TrajectoryStore.open(tmp_path / "many.zarr").n_episodes == 3  # none of the batch was written
    with pytest.raises(StoreError, match="2 seeds for the 1 episodes"):
        many.append_episodes([make_episode(2, rng)], seeds=[5, 6])


def test_seed_policy_and_read_only(good):
    path, _ = good
    rng = np.random.default_rng(3)
    with pytest.raises(StoreError, match="read-only"):
        TrajectoryStore.open(path).append_episode(make_episode(2, rng), seed=1)
    s = TrajectoryStore.open(path, mode="a")
    with pytest.raises(StoreError, match="needs a seed"):
        s.append_episode(make_episode(2, rng))
    s.append_episode(make_episode(2, rng), seed=-5)
    assert TrajectoryStore.open(path).episode_seeds.tolist() == [100, 101, 102, -5]


def test_failed_write_is_rolled_back(good):
    path, _ = good
    before = raw_lengths(path)
    s = TrajectoryStore.open(path, mode="a")

    class Exploding:  # a zarr array whose data write fails after the resize
        def __init__(self, arr):
            self.arr = arr
        shape = property(lambda self: self.arr.shape)
        def resize(self, shape):
            self.arr.resize(shape)
        def __setitem__(self, idx, value):
            raise OSError("disk full")

    real = s._arrays["action"]
    s._arrays["action"] = Exploding(real)  # keys are written state, image, action: the first two succeed
    with pytest.raises(StoreError) as e:
        s.append_episode(make_episode(30, np.random.default_rng(4)), seed=1)
    assert_one_sentence(e.value, path, "rolled back", "disk full", "episode 3")
    assert raw_lengths(path) == before and s.n_episodes == 3
    s._arrays["action"] = real
    s.append_episode(make_episode(30, np.random.default_rng(4)), seed=1)
    r = TrajectoryStore.open(path)
    r.validate()
    assert r.episode_lengths.tolist() == [*LENGTHS, 30]


# ---------------------------------------------------------------------------------------- bad stores
def _set_ends(ends):
    def tamper(path):
        a = zarr.open_array(str(path / "meta" / "episode_ends"), mode="r+")
        a.resize((len(ends),))
        a[:] = ends
    return tamper


def _replace_array(key, shape, dtype):
    def tamper(path):
        g = zarr.open_group(str(path / "data"), mode="r+")
        del g[key]
        g.create_array(key, shape=shape, dtype=dtype)
    return tamper


def _truncate(key, n):
    def tamper(path):
        a = zarr.open_array(str(path / "data" / key), mode="r+")
        a.resize((n, *a.shape[1:]))
    return tamper


def _set_attr(path):
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["il_policies"])
    meta["format_version"] = 99
    g.attrs["il_policies"] = meta


# name -> (tamper(path), words the message must contain)
BAD_STORES = {
    "no_data": (lambda p: shutil.rmtree(p / "data"), ["'data'"]),
    "no_episode_ends": (lambda p: shutil.rmtree(p / "meta" / "episode_ends"), ["episode_ends"]),
    "schema_key_without_array": (lambda p: shutil.rmtree(p / "data" / "state"), ["'state'"]),
    "shape_mismatch": (_replace_array("state", (57, 38), "float32"), ["'state'", "[38]", "[39]"]),
    "dtype_mismatch": (_replace_array("action", (57, 4), "float64"), ["'action'", "float64"]),
    "non_monotonic": (_set_ends([5, 3, 57]), ["episode_ends", "episode 1"]),
    "zero_length": (_set_ends([5, 5, 57]), ["episode_ends", "episode 1", "zero-length"]),
    "end_past_arrays": (_set_ends([5, 45, 60]), ["episode_ends", "episode 2", "60"]),
    "end_before_arrays": (_set_ends([5, 45, 50]), ["episode_ends", "episode 2", "50"]),
    "truncated": (_truncate("state", 30), ["'state'", "episode 1"]),
    "seeds_mismatch": (_truncate("../meta/episode_seeds", 2), ["episode_seeds", "episode 2"]),
    "corrupt_ends": (lambda p: (p / "meta/episode_ends/c/0").write_bytes(b"junk" * 9), ["episode_ends"]),
    "bad_version": (_set_attr, ["format_version"]),
    "not_a_group": (lambda p: (shutil.rmtree(p), p.mkdir()), ["not a zarr group"]),
    "a_file": (lambda p: (shutil.rmtree(p), p.write_text("hi")), ["not a zarr group"]),
    "does_not_exist": (lambda p: shutil.rmtree(p), ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(BAD_STORES))
def test_bad_store_raises_on_open(good, case):
    path, _ = good
    tamper, words = BAD_STORES[case]
    tamper(path)
    for mode in ("r", "a"):
        with pytest.raises(StoreError) as e:
            TrajectoryStore.open(path, mode=mode)
        assert_one_sentence(e.value, path, *words)


def test_corrupt_chunk(good):
    path, episodes = good
    # image chunks are 21 rows: chunk 1 holds steps 21-41, all inside episode 1 (steps 5-44)
    (path / "data/image/c/1/0/0/0").write_bytes(os.urandom(300))
    s = TrajectoryStore.open(path)  # open only reads metadata
    np.testing.assert_array_equal(s.episode(0)["image"], episodes[0]["image"])
    np.testing.assert_array_equal(s.episode(2)["image"], episodes[2]["image"])
    for call in (lambda: s.episode(1), s.load, lambda: s.load(["image"]), s.validate):
        with pytest.raises(StoreError) as e:
            call()
        assert_one_sentence(e.value, path, "'image'", "episode 1", "steps 21-41")
    assert s.load(["state", "action"])["state"].shape == (57, 39)


def test_lost_chunk_found_by_validate(good):
    path, _ = good
    s = TrajectoryStore.open(path)
    # state chunks are 26 rows: chunk 1 holds steps 26-51 (episodes 1-2); a lost chunk reads as zeros
    (path / "data/state/c/1/0").unlink()
    with pytest.raises(StoreError) as e:
        s.validate()
    assert_one_sentence(e.value, path, "'state'", "missing the chunk", "steps 26-51", "episodes 1-2")


def test_nan_in_stored_data(good):
    path, _ = good
    a = zarr.open_array(str(path / "data" / "state"), mode="r+")
    a[50, 3] = np.nan  # step 50 is in episode 2
    s = TrajectoryStore.open(path)
    for call in (s.validate, s.load, lambda: s.episode(2)):
        with pytest.raises(StoreError) as e:
            call()
        assert_one_sentence(e.value, path, "'state'", "episode 2", "step 50")
    s.episode(1)


def test_zarr_array_instead_of_group_and_bad_index(tmp_path, good):
    path, _ = good
    with pytest.raises(StoreError) as e:
        TrajectoryStore.open(path / "data" / "state")
    assert_one_sentence(e.value, path / "data" / "state", "zarr array")
    with pytest.raises(StoreError) as e:
        TrajectoryStore.open(path).episode(3)
    assert_one_sentence(e.value, path, "episode 3")
    with pytest.raises(StoreError, match="'nope'"):
        TrajectoryStore.open(path).load(["nope"])


def test_create_refusals(tmp_path, good):
    path, _ = good
    with pytest.raises(StoreError, match="already exists"):
        TrajectoryStore.create(path, KEYS, fps=10, task="t")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not a zarr group"):
        TrajectoryStore.create(plain, KEYS, fps=10, task="t", overwrite=True)
    assert (plain / "precious.txt").exists()
    two_actions = {**KEYS, "state": KeySpec((39,), "float32", "action")}
    bad = {"two actions": two_actions, "slash": {**KEYS, "a/b": KEYS["state"]},
           "rgb float": {**KEYS, "image": KeySpec(IMG, "float32", "rgb")},
           "bad kind": {**KEYS, "image": KeySpec(IMG, "uint8", "depth")}}
    for name, keys in bad.items():
        with pytest.raises(StoreError):
            TrajectoryStore.create(tmp_path / f"{name}.zarr", keys, fps=10, task="t")
        assert not (tmp_path / f"{name}.zarr").exists(), name
    with pytest.raises(StoreError, match="provenance"):
        TrajectoryStore.create(tmp_path / "p.zarr", KEYS, fps=10, task="t", provenance={"x": object()})
    s = TrajectoryStore.create(path, KEYS, fps=10, task="new", overwrite=True)
    assert s.n_episodes == 0 and TrajectoryStore.open(path).task == "new"


# ---------------------------------------------------------------------------------------- inspect CLI
def test_inspect_cli(good):
    path, episodes = good
    bad = path.with_name("bad.zarr")
    shutil.copytree(path, bad)
    (bad / "data/image/c/1/0/0/0").write_bytes(b"garbage" * 40)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "il_policies.data.inspect", str(p)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (path, bad)]
    (out, err), (bad_out, bad_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0, err
    assert str(path) in out and "zarr v3" in out and "metaworld_push" in out and "80.0" in out
    assert "episodes:    3" in out and "steps:       57" in out and "min 5" in out and "max 40" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[:1] in (["state"], ["image"], ["action"])}
    assert set(rows) == set(KEYS)
    assert rows["image"][1:4] == ["rgb", "[8,", "8,"] and rows["image"][-1] == "-"
    assert rows["action"][1:4] == ["action", "[4]", "float32"]
    state = np.concatenate([e["state"] for e in episodes]).astype(np.float64)
    assert float(rows["state"][-4]) == pytest.approx(state.min(), rel=1e-3)
    assert float(rows["state"][-2]) == pytest.approx(state.mean(), abs=1e-3)
    assert float(rows["state"][-1]) == pytest.approx(state.std(), rel=1e-3)
    assert json.loads(out.split("provenance:")[1].splitlines()[0]) == {"by": "test", "n": 3}
    # the corrupt copy: exit 2, one line on stderr naming path, key and episode
    assert procs[1].returncode == 2 and bad_out == ""
    lines = bad_err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "'image'" in lines[0] and "episode 1" in lines[0]
