"""LeRobotDataset (v2.1 / v3.0) -> trajectory store (il_policies.data.lerobot_import, datasets/convert_lerobot.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from il_policies.data.lerobot_import import convert_lerobot, parse_episodes
from il_policies.data.store import StoreError, TrajectoryStore
from tests.lerobot_fixtures import (CAMERAS, FPS, LENGTHS, TASKS, action, colour, encode_mp4, frames, gripper,
                                    identify, state, write_lerobot)

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "datasets" / "convert_lerobot.py"
LAYOUTS = ("v2.1", "v3.0")


@pytest.fixture(scope="module", params=LAYOUTS)
def dataset(request, tmp_path_factory) -> Path:
    return write_lerobot(tmp_path_factory.mktemp(request.param) / "toy_pick", version=request.param)


def assert_episode(store: TrajectoryStore, i: int, ep: int, cams=CAMERAS):
    T = LENGTHS[ep]
    data = store.episode(i)
    np.testing.assert_array_equal(data["state"], state(ep, T))
    np.testing.assert_array_equal(data["action"], action(ep, T))
    np.testing.assert_array_equal(data["gripper"], gripper(ep, T)[:, None])
    for cam, name in enumerate(cams):
        images = data[f"image_{name}"]
        assert images.shape == (T, 32, 32, 3) and images.dtype == np.uint8
        for t in range(T):  # each decoded frame is the right one, and close to the colour encoded
            assert identify(images[t], dict(enumerate(LENGTHS)), cam) == (ep, t), (name, ep, t)
            assert np.abs(images[t].astype(int) - colour(ep, t, cam)).max() <= 6, (name, ep, t)


def test_convert_all_episodes(dataset, tmp_path):
    store = convert_lerobot(dataset, tmp_path / "out.zarr")
    store = TrajectoryStore.open(tmp_path / "out.zarr")
    store.validate()
    assert store.n_episodes == 4 and store.episode_lengths.tolist() == list(LENGTHS)
    assert {k: (s.kind, s.dtype, s.shape) for k, s in store.keys.items()} == {
        "state": ("low_dim", "float32", (4,)), "gripper": ("low_dim", "float32", (1,)),
        "image_top": ("rgb", "uint8", (32, 32, 3)), "image_wrist": ("rgb", "uint8", (32, 32, 3)),
        "action": ("action", "float32", (2,))}
    for ep in range(4):
        assert_episode(store, ep, ep)
    assert store.fps == FPS and store.task == TASKS[0]
    version = json.loads((dataset / "meta/info.json").read_text())["codebase_version"]
    assert store.provenance == {
        "source": "lerobot", "dir": str(dataset), "codebase_version": version, "robot_type": "toy_arm",
        "episodes": [0, 1, 2, 3], "tasks": list(TASKS), "episode_tasks": [list(TASKS)] * 4,
        "features": {"state": "observation.state", "gripper": "observation.gripper",
                     "image_top": "observation.images.top", "image_wrist": "observation.images.wrist",
                     "action": "action"},
        "skipped_features": ["next.done", "timestamp", "frame_index", "episode_index", "index", "task_index"],
        "decoder": store.provenance["decoder"]}
    assert store.provenance["decoder"].startswith("pyav ")


def test_episode_selection(dataset, tmp_path):
    store = convert_lerobot(dataset, tmp_path / "sel.zarr", episodes=[3, 1, 3])
    assert store.provenance["episodes"] == [1, 3] and store.episode_lengths.tolist() == [LENGTHS[1], LENGTHS[3]]
    assert_episode(store, 0, 1)
    assert_episode(store, 1, 3)
    with pytest.raises(StoreError, match=r"has no episode 7 \(episodes 0-3 are listed\)\.$"):
        convert_lerobot(dataset, tmp_path / "none.zarr", episodes=[2, 7])


def test_parse_episodes():
    assert parse_episodes("0-49") == list(range(50))
    assert parse_episodes("3,5,7-9") == [3, 5, 7, 8, 9]
    assert parse_episodes(" 2 , 2-3") == [2, 3]
    for bad in ("", "1-", "a", "5-3", "1,,2"):
        with pytest.raises(StoreError, match="episode selection"):
            parse_episodes(bad)


@pytest.mark.parametrize("version", LAYOUTS)
def test_png_camera_and_several_tasks(version, tmp_path):
    tasks = ("pick up the cube", "stack the cubes")
    src = write_lerobot(tmp_path / "two_tasks", version=version, png_camera=True, tasks=tasks)
    store = convert_lerobot(src, tmp_path / "out.zarr")
    assert store.keys["image_side"].kind == "rgb"
    for ep in range(4):
        np.testing.assert_array_equal(store.episode(ep)["image_side"], frames(ep, LENGTHS[ep], 2, 32))  # lossless
    assert store.task == "two_tasks" and store.provenance["tasks"] == list(tasks)
    assert store.provenance["episode_tasks"] == [[tasks[0]], [tasks[1]], [tasks[0]], [tasks[1]]]
    one_task = convert_lerobot(src, tmp_path / "one.zarr", episodes=[1, 3])
    assert one_task.task == tasks[1]


def test_pick_frames_by_time_not_position(tmp_path):
    """A row takes the frame shown at its timestamp: a video with as many frames as rows but shown at
    0, 0.2, 0.4 s has no frame for the row at 0.1 s.  (The v3 fixtures leave gaps between episodes, so
    there a row's frame is never the file's frame with the same number.)"""
    src = write_lerobot(tmp_path / "gappy", version="v2.1", lengths=(3,))
    encode_mp4(src / "videos/chunk-000/observation.images.top/episode_000000.mp4", frames(0, 3, 0, 32), FPS,
               slots=[0, 2, 4])
    with pytest.raises(StoreError, match=r"no frame within half a frame period of row 1 \(time 0\.1000 s"):
        convert_lerobot(src, tmp_path / "out.zarr")


def test_v20_with_channel_first_camera_metadata(tmp_path):
    """v2.0 (as v2.1 but stats.json) and cameras described as [3, H, W] with names channel, height, width."""
    src = write_lerobot(tmp_path / "old", version="v2.1", lengths=(4, 2))
    info = json.loads((src / "meta/info.json").read_text())
    info["codebase_version"] = "v2.0"
    info["features"]["observation.images.top"].update(shape=[3, 32, 32], names=["channel", "height", "width"])
    (src / "meta/info.json").write_text(json.dumps(info))
    store = convert_lerobot(src, tmp_path / "out.zarr")
    assert store.keys["image_top"].shape == (32, 32, 3) and store.provenance["codebase_version"] == "v2.0"
    assert identify(store.episode(1)["image_top"][1], {0: 4, 1: 2}, 0) == (1, 1)


def _edit_info(**changes):
    def edit(root):
        info = json.loads((root / "meta/info.json").read_text())
        info.update(changes)
        (root / "meta/info.json").write_text(json.dumps(info))
    return edit


def _delete(rel):
    return lambda root: (root / rel).unlink()


BAD = {  # id: (version, writer options, edit, words the one-sentence error must contain)
    "video_shorter_v21": ("v2.1", {"video_lengths": {2: 5}}, None,
                          ["episode 2", "'observation.images.top'", "episode_000002.mp4", "5 frames", "6 rows"]),
    "video_shorter_v30": ("v3.0", {"video_lengths": {1: 2}}, None,
                          ["episode 1", "'observation.images.top'", "file-000.mp4", "2 frames", "3 rows"]),
    "length_mismatch_v21": ("v2.1", {"listed_lengths": {3: 7}}, None,
                            ["episode 3", "episode_000003.parquet", "4 rows", "meta/episodes.jsonl", "length is 7"]),
    "length_mismatch_v30": ("v3.0", {"listed_lengths": {0: 4}}, None,
                            ["episode 0", "data/chunk-000/file-000.parquet", "5 rows",
                             "meta/episodes/chunk-000/file-000.parquet", "length is 4"]),
    "no_info": ("v3.0", {}, _delete("meta/info.json"), ["meta/info.json is missing"]),
    "unknown_version": ("v2.1", {}, _edit_info(codebase_version="v1.6"),
                        ["meta/info.json", "codebase_version 'v1.6'", "v2.0, v2.1, v3.0"]),
    "missing_video_v21": ("v2.1", {}, _delete("videos/chunk-000/observation.images.wrist/episode_000001.mp4"),
                          ["episode 1", "'observation.images.wrist'", "episode_000001.mp4 is missing"]),
    "missing_video_v30": ("v3.0", {}, _delete("videos/observation.images.wrist/chunk-000/file-001.mp4"),
                          ["episode 3", "'observation.images.wrist'", "file-001.mp4 is missing"]),
    "missing_data_v30": ("v3.0", {}, _delete("data/chunk-000/file-001.parquet"),
                         ["episode 3", "data file data/chunk-000/file-001.parquet is missing"]),
    "missing_episodes_jsonl": ("v2.1", {}, _delete("meta/episodes.jsonl"), ["meta/episodes.jsonl is missing"]),
    "malformed_info": ("v3.0", {}, lambda root: (root / "meta/info.json").write_text("{"), ["meta/info.json", "JSON"]),
    "no_action_feature": ("v3.0", {}, lambda root: _edit_info(features={})(root), ["'action' feature"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dataset_one_sentence(case, tmp_path):
    version, options, edit, words = BAD[case]
    src = write_lerobot(tmp_path / "bad", version=version, **options)
    if edit:
        edit(src)
    out = tmp_path / "out.zarr"
    with pytest.raises(StoreError) as info:
        convert_lerobot(src, out)
    msg = str(info.value)
    assert msg.startswith(f"LeRobot dataset {src}: ") and msg.endswith(".") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # nothing written, nothing left aside


def test_failure_leaves_existing_output_untouched(tmp_path):
    good = write_lerobot(tmp_path / "good", version="v3.0")
    out = tmp_path / "out.zarr"
    convert_lerobot(good, out, episodes=[0])
    with pytest.raises(StoreError, match="already exists"):
        convert_lerobot(good, out)
    bad = write_lerobot(tmp_path / "bad", version="v3.0", video_lengths={3: 1})
    with pytest.raises(StoreError, match="episode 3"):
        convert_lerobot(bad, out, overwrite=True)
    assert TrajectoryStore.open(out).provenance["episodes"] == [0]  # the old store is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "out.zarr"]
    assert convert_lerobot(good, out, overwrite=True).n_episodes == 4


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # exercise the repo-root fallback
    return subprocess.run([sys.executable, str(CLI.relative_to(REPO)), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli(tmp_path):
    src = write_lerobot(tmp_path / "toy", version="v3.0")
    out = tmp_path / "cli.zarr"
    r = _cli(src, out, "--episodes", "1-2")
    assert r.returncode == 0, r.stderr
    assert "2 episodes" in r.stdout and "9 steps" in r.stdout and "image_top (rgb)" in r.stdout
    assert TrajectoryStore.open(out).provenance["episodes"] == [1, 2]
    shutil.rmtree(src / "videos")
    r = _cli(src, out, "--overwrite")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "episode 0" in r.stderr and "is missing" in r.stderr
    r = _cli(src, out, "--episodes", "2-1", "--overwrite")
    assert r.returncode == 2 and "episode selection" in r.stderr
    assert TrajectoryStore.open(out).n_episodes == 2  # failed overwrites left the old store in place
