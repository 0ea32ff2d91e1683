"""robomimic HDF5 -> trajectory store conversion (il_policies.data.robomimic_import, datasets/convert_robomimic.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from il_policies.data.robomimic_import import convert_robomimic, sort_demos
from il_policies.data.store import StoreError, TrajectoryStore

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "datasets" / "convert_robomimic.py"
# demo_2 vs demo_10: numeric order differs from h5py's (lexicographic) listing order
LENGTHS = {"demo_0": 5, "demo_2": 4, "demo_10": 3}
ENV_ARGS = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 15, "has_renderer": False}}


def eef(n: int, T: int) -> np.ndarray:
    return (n * 100 + np.arange(T)[:, None] + np.array([0.0, 0.25, 0.5])).astype(np.float64)


def image(n: int, T: int) -> np.ndarray:
    return ((n * 10 + np.arange(T)) % 256).astype(np.uint8)[:, None, None, None] * np.ones((1, 6, 5, 3), np.uint8)


def action(n: int, T: int) -> np.ndarray:
    return (-(n * 100 + np.arange(T, dtype=np.float64))[:, None] * np.array([1.0, 2.0])).astype(np.float64)


def write_robomimic(path: Path, env_args=ENV_ARGS, mask=True, edit=None) -> Path:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if env_args is not None:
            data.attrs["env_args"] = json.dumps(env_args)
        data.attrs["total"] = sum(LENGTHS.values())
        for name, T in LENGTHS.items():
            n = int(name[5:])
            g = data.create_group(name)
            g.attrs["num_samples"] = T
            g["obs/robot0_eef_pos"] = eef(n, T)
            g["obs/agentview_image"] = image(n, T)
            g["obs/depth"] = np.full((T, 2, 2, 1), n, np.uint8)  # uint8 but not HWC-3: low_dim
            g["actions"] = action(n, T)
            g["rewards"] = np.zeros(T)
            g["dones"] = np.zeros(T, np.int64)
        if mask:
            f["mask/train"] = np.array(["demo_10", "demo_0"], dtype="S")
            f["mask/valid"] = np.array(["demo_2"], dtype="S")
        if edit:
            edit(f)
    return path


@pytest.fixture
def rm_file(tmp_path) -> Path:
    return write_robomimic(tmp_path / "lift_ph.hdf5")


def test_sort_demos_is_numeric():
    assert sort_demos(["demo_10", "demo_2", "demo_1", "x", "demo_0"]) == ["demo_0", "demo_1", "demo_2", "demo_10", "x"]


def test_convert_all_demos(rm_file, tmp_path):
    store = convert_robomimic(rm_file, tmp_path / "out.zarr")
    store = TrajectoryStore.open(tmp_path / "out.zarr")
    store.validate()
    assert store.n_episodes == 3
    assert store.episode_lengths.tolist() == [5, 4, 3]  # demo_0, demo_2, demo_10
    assert {k: (s.kind, s.dtype, s.shape) for k, s in store.keys.items()} == {
        "robot0_eef_pos": ("low_dim", "float32", (3,)),
        "agentview_image": ("rgb", "uint8", (6, 5, 3)),
        "depth": ("low_dim", "float32", (2, 2, 1)),
        "action": ("action", "float32", (2,)),
    }
    for i, name in enumerate(["demo_0", "demo_2", "demo_10"]):
        ep, n, T = store.episode(i), int(name[5:]), LENGTHS[name]
        assert ep["robot0_eef_pos"].dtype == np.float32 and ep["action"].dtype == np.float32
        np.testing.assert_array_equal(ep["robot0_eef_pos"], eef(n, T).astype(np.float32))
        np.testing.assert_array_equal(ep["agentview_image"], image(n, T))
        np.testing.assert_array_equal(ep["depth"], np.full((T, 2, 2, 1), n, np.float32))
        np.testing.assert_array_equal(ep["action"], action(n, T).astype(np.float32))
    assert store.task == "Lift" and store.fps == 15.0
    assert store.provenance == {"source": "robomimic", "file": str(rm_file.absolute()), "env_args": ENV_ARGS,
                                "filter_keys": ["train", "valid"], "filter_key": None,
                                "demos": ["demo_0", "demo_2", "demo_10"]}


def test_filter_key_obs_keys_and_fps(rm_file, tmp_path):
    store = convert_robomimic(rm_file, tmp_path / "out.zarr", filter_key="train",
                              obs_keys=["agentview_image"], fps=7.5)
    assert store.provenance["demos"] == ["demo_0", "demo_10"] and store.provenance["filter_key"] == "train"
    assert store.episode_lengths.tolist() == [5, 3]
    assert set(store.keys) == {"agentview_image", "action"}
    np.testing.assert_array_equal(store.episode(1)["action"], action(10, 3).astype(np.float32))
    assert store.fps == 7.5
    with pytest.raises(StoreError, match=r"filter key 'test'.*train, valid"):
        convert_robomimic(rm_file, tmp_path / "other.zarr", filter_key="test")


def test_defaults_without_env_args_or_control_freq(tmp_path):
    store = convert_robomimic(write_robomimic(tmp_path / "can_mh.hdf5", env_args=None, mask=False), tmp_path / "a.zarr")
    assert store.task == "can_mh" and store.fps == 20.0
    assert store.provenance["env_args"] is None and store.provenance["filter_keys"] == []
    no_freq = {"env_name": "PickPlaceCan", "type": 1, "env_kwargs": {}}
    store = convert_robomimic(write_robomimic(tmp_path / "b.hdf5", env_args=no_freq), tmp_path / "b.zarr")
    assert store.task == "PickPlaceCan" and store.fps == 20.0


def test_existing_output_needs_overwrite(rm_file, tmp_path):
    out = tmp_path / "out.zarr"
    convert_robomimic(rm_file, out, filter_key="valid")
    with pytest.raises(StoreError, match="already exists"):
        convert_robomimic(rm_file, out)
    assert TrajectoryStore.open(out).n_episodes == 1  # untouched
    assert convert_robomimic(rm_file, out, overwrite=True).n_episodes == 3


def _delete(path):
    return lambda f: f.__delitem__(path)


def _replace(path, value):
    def edit(f):
        del f[path]
        f[path] = value
    return edit


BAD = {  # id: (edit, obs_keys, words the one-sentence error must contain)
    "no_data_group": (_delete("data"), None, ["'data' group"]),
    "demo_without_actions": (_delete("data/demo_2/actions"), None, ["'demo_2'", "'actions'"]),
    "demo_without_obs": (_delete("data/demo_10/obs"), None, ["'demo_10'", "'obs'"]),
    "length_mismatch": (_replace("data/demo_2/obs/robot0_eef_pos", np.zeros((3, 3))), None,
                        ["'demo_2'", "'robot0_eef_pos'", "3 steps", "has 4"]),
    "obs_key_missing_in_one_demo": (_delete("data/demo_10/obs/depth"), None, ["'demo_10'", "'depth'"]),
    "selected_key_missing_in_one_demo": (_delete("data/demo_2/obs/depth"), ["depth"], ["'demo_2'", "'depth'"]),
    "unknown_obs_key": (None, ["robot0_eef_pos", "object"], ["'demo_0'", "'object'", "agentview_image"]),
    "shape_differs_between_demos": (_replace("data/demo_10/obs/robot0_eef_pos", np.zeros((3, 4))), None,
                                    ["'demo_10'", "'robot0_eef_pos'", "[4]", "[3]"]),
    "nan_in_actions": (_replace("data/demo_10/actions", np.full((3, 2), np.nan)), None,
                       ["'demo_10'", "'actions'", "NaN"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_sentence(case, tmp_path):
    edit, obs_keys, words = BAD[case]
    src = write_robomimic(tmp_path / "bad.hdf5", edit=edit)
    out = tmp_path / "out.zarr"
    with pytest.raises(StoreError) as info:
        convert_robomimic(src, out, obs_keys=obs_keys)
    msg = str(info.value)
    assert msg.startswith(f"robomimic file {src.absolute()}: ") and msg.endswith(".") and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.hdf5"]  # no partial output


def test_missing_file(tmp_path):
    with pytest.raises(StoreError, match=r"robomimic file .*nope\.hdf5: does not exist\.$"):
        convert_robomimic(tmp_path / "nope.hdf5", tmp_path / "out.zarr")


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # exercise the repo-root fallback
    return subprocess.run([sys.executable, str(CLI.relative_to(REPO)), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli(rm_file, tmp_path):
    out = tmp_path / "cli.zarr"
    r = _cli(rm_file, out, "--obs-keys", "robot0_eef_pos,agentview_image", "--fps", "10", "--filter-key", "train")
    assert r.returncode == 0, r.stderr
    store = TrajectoryStore.open(out)
    assert set(store.keys) == {"robot0_eef_pos", "agentview_image", "action"} and store.fps == 10.0
    assert store.provenance["demos"] == ["demo_0", "demo_10"]
    np.testing.assert_array_equal(store.episode(1)["robot0_eef_pos"], eef(10, 3).astype(np.float32))
    r = _cli(rm_file, out, "--obs-keys", "robot0_eef_pos,gripper", "--overwrite")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "'gripper'" in r.stderr and "'demo_0'" in r.stderr and str(rm_file) in r.stderr
    assert TrajectoryStore.open(out).n_episodes == 2  # the failed overwrite left the old store in place
    lossless = tmp_path / "png.zarr"
    r = _cli(rm_file, lossless, "--image-codec", "png")
    assert r.returncode == 0, r.stderr
    images = TrajectoryStore.open(lossless)
    assert images.storage("agentview_image").startswith("png") and images.storage("robot0_eef_pos").startswith("blosc")
    reference = convert_robomimic(rm_file, tmp_path / "blosc.zarr")
    np.testing.assert_array_equal(images.load(["agentview_image"])["agentview_image"], reference.load(["agentview_image"])["agentview_image"])


def _robomimic_functions(*names):
    """robomimic.utils.file_utils' own functions, compiled from its source: importing the module costs ~10 s."""
    spec = importlib.util.find_spec("robomimic")
    if spec is None:
        pytest.skip("robomimic is not installed")
    src = Path(spec.origin).parent / "utils" / "file_utils.py"
    tree = ast.parse(src.read_text())
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    ns = {"h5py": h5py, "json": json, "np": np, "os": os}
    exec(compile(tree, str(src), "exec"), ns)
    return [ns[n] for n in names]


def test_agrees_with_robomimic_file_utils(rm_file, tmp_path):
    env_meta, filter_demos = _robomimic_functions("get_env_metadata_from_dataset", "get_demos_for_filter_key")
    store = convert_robomimic(rm_file, tmp_path / "t.zarr", filter_key="train", obs_keys=["depth"])
    assert store.provenance["env_args"] == env_meta(str(rm_file))
    # robomimic's SequenceDataset orders the filtered demos by np.argsort([int(elem[5:]) ...])
    demos = filter_demos(str(rm_file), "train")
    assert store.provenance["demos"] == [demos[i] for i in np.argsort([int(e[5:]) for e in demos])]
