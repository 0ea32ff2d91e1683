"""Camera keys stored as one image per frame (il_policies.data.codecs) inside zarr shards."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import il_policies.data.layout as layout
from il_policies.data.codecs import ImageCodec, parse_image_codec
from il_policies.data.dataset import SequenceDataset
from il_policies.data.store import KeySpec, StoreError, TrajectoryStore
from tests.conftest import REPO

SIZE = 16
KEYS = {"image": KeySpec((SIZE, SIZE, 3), "uint8", "rgb"), "state": KeySpec((2,), "float32", "low_dim"),
        "action": KeySpec((2,), "float32", "action")}


def smooth_frames(n: int, seed: int) -> np.ndarray:
    """Rendered-looking frames (smooth gradients and a moving square), not noise: lossy codecs behave as on camera images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    frames = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for t in range(n):
        base = np.stack([x * 8 + t, y * 8, (x + y) * 4 + 40], axis=-1) % 256
        cx, cy = (t + seed) % (SIZE - 4), (2 * t) % (SIZE - 4)
        base[cy : cy + 4, cx : cx + 4] = rng.integers(150, 255, size=3)
        frames[t] = base
    return frames


def episode(length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": smooth_frames(length, seed), "state": rng.normal(size=(length, 2)).astype(np.float32),
            "action": rng.normal(size=(length, 2)).astype(np.float32)}


def write(path, codec: str, lengths=(9, 14, 6)) -> list[dict]:
    episodes = [episode(n, i) for i, n in enumerate(lengths)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "CHUNK_TARGET_BYTES", 5 * SIZE * SIZE * 3)  # shards of 5 frames: episodes straddle them
        store = TrajectoryStore.create(path, KEYS, fps=10.0, task="codec_test", image_codec=codec)
        for i, ep in enumerate(episodes):
            store.append_episode(ep, seed=i)
    return episodes


@pytest.mark.parametrize("codec", ["png", "qoi", "jpegxl:lossless", "webp:lossless", "jpeg:lossless"])
def test_lossless_image_codecs_give_back_every_frame(tmp_path, codec):
    episodes = write(tmp_path / "s.zarr", codec)
    store = TrajectoryStore.open(tmp_path / "s.zarr")
    assert store.chunk_rows("image") == 5 and "per shard" in store.storage("image")
    for i, ep in enumerate(episodes):
        np.testing.assert_array_equal(store.episode(i)["image"], ep["image"])
    store.validate()


@pytest.mark.parametrize("codec,min_psnr", [("jpeg:95", 35.0), ("jpegxl:90", 35.0), ("avif:90", 35.0), ("webp:90", 30.0)])
def test_lossy_image_codecs_stay_close_and_appending_never_re_encodes_earlier_frames(tmp_path, codec, min_psnr):
    path = tmp_path / "s.zarr"
    episodes = write(path, codec, lengths=(9, 14))
    before = TrajectoryStore.open(path).load(["image"])["image"]
    truth = np.concatenate([ep["image"] for ep in episodes]).astype(np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((before - truth) ** 2))
    assert min_psnr < psnr < 100, psnr  # lossy, and close
    store = TrajectoryStore.open(path, mode="a")
    store.append_episode(episode(6, 7), seed=2)  # rewrites the last, partly filled shard
    after = TrajectoryStore.open(path).load(["image"])["image"]
    np.testing.assert_array_equal(after[: len(before)], before)  # the frames already there kept their bytes


def test_a_lazy_dataset_over_an_image_codec_store_matches_the_in_memory_one(tmp_path):
    write(tmp_path / "s.zarr", "jpeg:90")
    window = dict(n_obs_steps=2, horizon=3, val_ratio=0)
    memory = SequenceDataset.from_store(tmp_path / "s.zarr", in_memory=True, **window)
    lazy = SequenceDataset.from_store(tmp_path / "s.zarr", in_memory=False, cache_mb=0.001, **window)
    indices = np.random.default_rng(0).permutation(len(memory))
    np.testing.assert_array_equal(lazy.__getitems__(indices)["obs"]["image"], memory.__getitems__(indices)["obs"]["image"])


def test_bad_codec_options_and_a_corrupt_frame_are_one_sentence(tmp_path):
    for text, words in (("gif:90", "one of"), ("jpeg:high", "format:quality"), ("png:50", "lossless only"), ("jpeg:0", "[1, 100]")):
        with pytest.raises(StoreError) as error:
            TrajectoryStore.create(tmp_path / f"{text.replace(':', '_')}.zarr", KEYS, fps=10.0, task="t", image_codec=text)
        assert words in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(StoreError, match="1 or 3"):
        bad_keys = {**KEYS, "image": KeySpec((SIZE, SIZE, 4), "uint8", "rgb")}
        TrajectoryStore.create(tmp_path / "rgba.zarr", bad_keys, fps=10.0, task="t", image_codec="png")
    path = tmp_path / "s.zarr"
    write(path, "png")
    shard = path / "data/image/c/2/0/0/0"  # steps 10-14: episodes 1
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(StoreError) as error:
        TrajectoryStore.open(path).validate()
    message = str(error.value)
    assert str(path) in message and "'image'" in message and "episode 1" in message and "\n" not in message
    assert parse_image_codec(None) is None and parse_image_codec("jpegxl:lossless") == ImageCodec("jpegxl", None)


def test_inspect_reads_an_image_codec_store_and_names_its_codec(tmp_path):
    write(tmp_path / "s.zarr", "jpeg:95")
    out = subprocess.run([sys.executable, "-m", "il_policies.data.inspect", str(tmp_path / "s.zarr")], cwd=REPO, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert "image: jpeg:95, 1 per chunk, 5 per shard" in out and "episodes:    3" in out
