"""Stores on object storage: a real S3-compatible server (moto's server mode) on loopback."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from il_policies.data.dataset import SequenceDataset
from il_policies.data.store import StoreError, TrajectoryStore
from il_policies.training import Workspace
from tests.conftest import REPO, make_cfg, write_linear_store

BUCKET = "demos"


@pytest.fixture(scope="module")
def s3():
    """An S3 server on a free loopback port for this module, with the environment a user would set."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2"}
    deadline = time.monotonic() + 20
    while True:  # ready when it answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs, env
    server.stop()


@pytest.fixture(scope="module")
def stores(s3, tmp_path_factory):
    """The same episodes in a local store and in the bucket (written through TrajectoryStore.create)."""
    local = tmp_path_factory.mktemp("remote") / "local.zarr"
    write_linear_store(local, n_episodes=4, length=20, image_size=12)
    source = TrajectoryStore.open(local)
    url = f"s3://{BUCKET}/demo.zarr"
    remote = TrajectoryStore.create(url, source.keys, fps=source.fps, task=source.task, image_codec="png")
    for i in range(source.n_episodes):
        remote.append_episode(source.episode(i), seed=i)
    return local, url


def test_a_store_written_to_s3_reads_back_validates_and_inspects(stores, s3):
    local, url = stores
    remote, source = TrajectoryStore.open(url), TrajectoryStore.open(local)
    assert remote.path == url and remote.n_episodes == 4 and "png" in remote.storage("image")
    for key, value in source.load().items():
        np.testing.assert_array_equal(remote.load([key])[key], value)
    remote.validate()
    out = subprocess.run([sys.executable, "-m", "il_policies.data.inspect", url], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, **s3[1], "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert url in out.stdout and "episodes:    4" in out.stdout
    with pytest.raises(StoreError, match="already exists"):
        TrajectoryStore.create(url, source.keys, fps=10.0, task="t")
    with pytest.raises(StoreError, match="the URL is not a zarr group"):
        TrajectoryStore.open(f"s3://{BUCKET}/nothing.zarr")


def test_lazy_reads_from_s3_give_the_local_batches(stores):
    local, url = stores
    window = dict(n_obs_steps=2, horizon=3, val_ratio=0.25)
    memory = SequenceDataset.from_store(local, in_memory=True, **window)
    lazy = SequenceDataset.from_store(url, in_memory=False, cache_mb=0.01, **window)
    assert lazy.lazy_keys == ["image"]
    indices = np.random.default_rng(0).permutation(len(memory))[:32]
    a, b = memory.__getitems__(indices), lazy.__getitems__(indices)
    for key in a["obs"]:
        np.testing.assert_array_equal(b["obs"][key], a["obs"][key])
    np.testing.assert_array_equal(b["action"], a["action"])


def test_training_from_s3_equals_training_from_local_disk(stores, tmp_path):
    local, url = stores
    common = ["policy=bc", "policy.hidden_dims=[32]", "training.steps=4", "training.batch_size=8", "eval.n_episodes=0",
              "data.batch_order=chunked"]
    # the S3 run reads through 2 forked loader workers, which open the bucket themselves
    runs = [Workspace(make_cfg([*common, f"task.dataset_path={path}", *reading]), tmp_path / name)
            for name, path, reading in (("local", local, ["data.in_memory=true"]),
                                        ("s3", url, ["data.in_memory=false", "data.num_workers=2"]))]
    for run in runs:
        run.run()
    for key, value in runs[0].policy.state_dict().items():
        torch.testing.assert_close(runs[1].policy.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_lost_or_corrupt_object_names_the_key_and_episode(stores, s3):
    fs = s3[0]
    local, _ = stores
    source = TrajectoryStore.open(local)
    url = f"s3://{BUCKET}/damaged.zarr"
    damaged = TrajectoryStore.create(url, source.keys, fps=10.0, task="t")
    for i in range(source.n_episodes):
        damaged.append_episode(source.episode(i), seed=i)
    chunk = damaged.chunk_rows("state")
    fs.pipe(f"{BUCKET}/damaged.zarr/data/image/c/0/0/0/0", b"junk" * 10)
    with pytest.raises(StoreError) as error:
        TrajectoryStore.open(url).episode(1)
    message = str(error.value)
    assert url in message and "'image'" in message and "episode" in message and "\n" not in message
    fs.rm(f"{BUCKET}/damaged.zarr/data/state/c/0/0")
    with pytest.raises(StoreError, match=r"'state' is missing the chunk file for steps 0-") as error:
        TrajectoryStore.open(url).validate()
    assert chunk >= 80
