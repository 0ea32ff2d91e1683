"""Every inference backend gives the reference network's actions, for every registered policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from il_policies import load_policy
from il_policies.accel.backends import onnx_metadata
from il_policies.data.dataset import collate_batch, prepare_batch
from il_policies.training import Workspace
from tests.conftest import REPO, make_cfg
from tests.test_policies import CONFIGS, small_overrides

# Tolerance against eager torch: the runtimes reorder float32 sums (fused kernels, other matmul blockings).
RTOL, ATOL = 1e-4, 2e-5


def seeded() -> torch.Generator:
    """Sampling policies (Diffusion) draw their initial noise from it: the same for both backends."""
    return torch.Generator().manual_seed(11)


@pytest.fixture(scope="module", params=CONFIGS)
def trained(request, image_store, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"backend_{request.param}")
    cfg = make_cfg([*small_overrides(request.param), f"task.dataset_path={image_store}", "training.steps=3", "training.batch_size=8",
                    "policy.n_obs_steps=2", "policy.horizon=4", "policy.n_action_steps=2"])
    workspace = Workspace(cfg, out)
    workspace.run()
    return workspace, out / "checkpoints" / "latest.pt"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_actions_equal_torchs(trained, backend, tmp_path):
    workspace, checkpoint = trained
    reference = load_policy(checkpoint)
    fast = load_policy(checkpoint, backend=backend, onnx_path=tmp_path / "policy.onnx")
    dataset = workspace.dataset
    batch = prepare_batch(collate_batch(dataset.__getitems__([0, 3, 7])), dataset.shape_meta, "cpu")
    torch.testing.assert_close(fast.predict_action_chunk(batch["obs"], seeded()), reference.predict_action_chunk(batch["obs"], seeded()),
                               rtol=RTOL, atol=ATOL)
    # The robot path at batch 1 (a dynamic batch dimension), numpy uint8 HWC in, through history and queue.
    for policy in (fast, reference):
        policy.reset()
    for index in (0, 1, 2):
        raw = {key: value[-1] for key, value in dataset[index]["obs"].items()}
        np.testing.assert_allclose(fast.select_action(raw, seeded()), reference.select_action(raw, seeded()), rtol=RTOL, atol=ATOL)


def test_torch_accel_backend_equals_the_reference(trained):
    workspace, checkpoint = trained
    reference, fast = load_policy(checkpoint), load_policy(checkpoint, accel=True)
    dataset = workspace.dataset
    batch = prepare_batch(collate_batch(dataset.__getitems__([1, 4])), dataset.shape_meta, "cpu")
    torch.testing.assert_close(fast.predict_action_chunk(batch["obs"], seeded()), reference.predict_action_chunk(batch["obs"], seeded()),
                               rtol=RTOL, atol=ATOL)


def test_the_export_is_cached_next_to_the_checkpoint_and_follows_it(linear_store, tmp_path):
    overrides = ["policy=bc", "policy.hidden_dims=[16]", f"task.dataset_path={linear_store}", "training.batch_size=4"]
    Workspace(make_cfg([*overrides, "training.steps=2"]), tmp_path).run()
    checkpoint = tmp_path / "checkpoints" / "latest.pt"
    first = load_policy(checkpoint, backend="onnxruntime")
    cached = checkpoint.with_suffix(".onnx")
    assert cached.is_file() and onnx_metadata(cached)["policy"] == "bc"
    stamp = cached.stat().st_mtime_ns
    load_policy(checkpoint, backend="onnxruntime")
    assert cached.stat().st_mtime_ns == stamp  # the same checkpoint: the cached file is used
    Workspace(make_cfg([*overrides, "training.steps=4"]), tmp_path).run()  # resumes and writes a new latest.pt
    again = load_policy(checkpoint, backend="onnxruntime")
    assert cached.stat().st_mtime_ns != stamp
    obs = {"state": np.linspace(-1, 1, 5)}
    np.testing.assert_allclose(again.select_action(obs), load_policy(checkpoint).select_action(obs), rtol=RTOL, atol=ATOL)
    assert not np.allclose(first.select_action(obs), again.select_action(obs))


def test_export_command_writes_a_file_onnxruntime_alone_can_run(linear_store, tmp_path):
    cfg = make_cfg(["policy=bc", "policy.hidden_dims=[16]", f"task.dataset_path={linear_store}", "training.steps=2", "training.batch_size=4"])
    Workspace(cfg, tmp_path).run()
    checkpoint, out = tmp_path / "checkpoints" / "latest.pt", tmp_path / "policy.onnx"
    run = subprocess.run([sys.executable, "-m", "il_policies.export", f"checkpoint={checkpoint}", f"out={out}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    # In a process without torch: onnxruntime and numpy only, the observation shapes from the file's metadata.
    code = (
        "import json, sys, numpy as np, onnxruntime as ort\n"
        f"session = ort.InferenceSession({str(out)!r}, providers=['CPUExecutionProvider'])\n"
        "meta = json.loads(session.get_modelmeta().custom_metadata_map['il_policies'])\n"
        "shape = [1, meta['n_obs_steps'], *meta['observations']['state']['shape']]\n"
        "chunk = session.run(['action'], {'state': np.full(shape, 0.5, np.float32)})[0]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'chunk': chunk.tolist()}))"
    )
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert alone.returncode == 0, alone.stderr[-2000:]
    result = json.loads(alone.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    expected = load_policy(checkpoint).predict_action_chunk({"state": torch.full((1, 1, 5), 0.5)})
    np.testing.assert_allclose(np.asarray(result["chunk"]), expected.numpy(), rtol=RTOL, atol=ATOL)
