"""The Workspace: overfitting, exact resume, NaN handling, data parallelism, the train.py entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from il_policies import load_policy
from il_policies.checkpoint import read_checkpoint
from il_policies.training import NonFiniteLossError, Workspace
from il_policies.training.state import clip_grad_norm
from il_policies.training.distributed import DistributedContext, GlobalBatchOrder
from tests.conftest import REPO, make_cfg
from tests.test_policies import small_overrides

BC_SMALL = ["policy=bc", "policy.hidden_dims=[64,64]"]


def test_bc_overfits_a_small_store(linear_store, tmp_path):
    # action = state @ W exactly, so a small MLP must get far below the 1.0 of predicting the mean.
    cfg = make_cfg([*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=600", "training.batch_size=32", "data.val_ratio=0"])
    summary = Workspace(cfg, tmp_path).run()
    assert summary["train/loss"] < 0.02, summary


def test_gradient_clipping_scales_a_norm_exactly_at_the_bound_as_torch_does():
    # torch's coefficient is max_norm / (norm + 1e-6): a norm of exactly the bound is scaled by 1 - 1e-7.
    ours, theirs = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    ours.grad, theirs.grad = torch.tensor([10.0]), torch.tensor([10.0])
    clip_grad_norm([ours], 10.0)
    torch.nn.utils.clip_grad_norm_([theirs], 10.0)
    assert torch.equal(ours.grad, theirs.grad) and theirs.grad.item() < 10.0


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_gradient_clipping_equals_torch_bit_for_bit(scale):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(50, 30)) for _ in range(4)] + [torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours[:-1], theirs[:-1]):  # the last parameter has no gradient
        p.grad = torch.randn_like(p) * scale
        q.grad = p.grad.clone()
    assert torch.equal(clip_grad_norm(ours, 10.0), torch.nn.utils.clip_grad_norm_(theirs, 10.0))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours[:-1], theirs[:-1]))
    norm = torch.cat([p.grad.flatten() for p in ours[:-1]]).norm()
    assert (norm <= 10.0 * (1 + 1e-5)) and (scale < 1 or norm > 9.99)  # clipped exactly when over the bound


def _params(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def run_until_interrupted(overrides: list[str], run_dir, step: int, monkeypatch) -> None:
    """Run the Workspace as Ctrl-C would stop it just before it trains step `step`."""
    original_step = Workspace._train_step

    def interrupt(self, batch):
        if self.step == step:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(Workspace, "_train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        Workspace(make_cfg(overrides), run_dir).run()
    monkeypatch.setattr(Workspace, "_train_step", original_step)


BC_DROPOUT = [*BC_SMALL, "policy.dropout=0.1"]  # dropout: the RNG state must be restored too (accel: numpy masks seeded from it)


@pytest.mark.parametrize("policy,ema,accel,store_fixture", [
    (BC_DROPOUT, False, False, "linear_store"), (BC_DROPOUT, True, False, "linear_store"), (BC_DROPOUT, False, True, "linear_store"),
    (BC_DROPOUT, False, False, "image_store"),  # random crops and colour jitter drawn from the restored generator
    (small_overrides("diffusion"), True, False, "image_store"),  # noise and diffusion steps drawn too
], ids=["bc", "bc-ema", "bc-accel", "bc-image", "diffusion-ema-image"])
def test_interrupted_run_resumes_to_identical_parameters(policy, store_fixture, request, tmp_path, monkeypatch, ema, accel):
    store = request.getfixturevalue(store_fixture)
    overrides = [
        *policy, "policy.augment.color_jitter=0.2",
        f"task.dataset_path={store}", "training.steps=40", "training.batch_size=16",
        f"training.ema.enabled={ema}", "training.lr_warmup_steps=5", f"training.accel={accel}",
    ]
    straight = Workspace(make_cfg(overrides), tmp_path / "straight")
    straight.run()

    interrupted_dir = tmp_path / "interrupted"
    run_until_interrupted(overrides, interrupted_dir, 20, monkeypatch)
    assert read_checkpoint(interrupted_dir / "checkpoints" / "latest.pt")["step"] == 20
    resumed = Workspace(make_cfg(overrides), interrupted_dir)
    summary = resumed.run()
    assert summary["step"] == 40
    for key, value in _params(straight.policy).items():
        torch.testing.assert_close(_params(resumed.policy)[key], value, rtol=0, atol=0, msg=key)
    a, b = load_policy(tmp_path / "straight/checkpoints/latest.pt"), load_policy(interrupted_dir / "checkpoints/latest.pt")
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(linear_store, tmp_path, monkeypatch):
    cfg = make_cfg([*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=30", "training.batch_size=16", "training.checkpoint_every=10"])
    workspace = Workspace(cfg, tmp_path)
    original_step = Workspace._train_step

    def poison_at_15(self, batch):
        if self.step == 15:
            batch["action"] = batch["action"] * float("nan")
        return original_step(self, batch)

    monkeypatch.setattr(Workspace, "_train_step", poison_at_15)
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 15"):
        workspace.run()
    latest = read_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert latest["step"] <= 15
    policy = load_policy(tmp_path / "checkpoints" / "latest.pt")
    assert all(torch.isfinite(v).all() for v in policy.state_dict().values() if v.is_floating_point())


def test_batch_order_is_the_same_for_any_world_size():
    one = GlobalBatchOrder(100, 8, seed=3)
    ranks = [GlobalBatchOrder(100, 4, seed=3, ctx=DistributedContext(rank=r, world_size=2)) for r in range(2)]
    single = [b for _, b in zip(range(30), one.iter_from(0))]
    split = [list(zip(range(30), r.iter_from(0))) for r in ranks]
    for step in range(30):
        assert split[0][step][1] + split[1][step][1] == single[step]
    # resuming at step k continues the same sequence
    assert [b for _, b in zip(range(10), one.iter_from(20))] == single[20:30]


def test_two_process_training_matches_one_process_on_the_combined_batch(linear_store, tmp_path):
    common = [*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=12", "data.val_ratio=0", "device=cpu", "logger.mode=disabled"]
    single = Workspace(make_cfg([*common, "training.batch_size=16"]), tmp_path / "single")
    single.run()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_endpoint=127.0.0.1:0",
         "--rdzv_backend=c10d", str(REPO / "tests" / "ddp_worker.py"), str(tmp_path / "ddp"), *common, "training.batch_size=8"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    for key, value in rank0.items():
        torch.testing.assert_close(rank1[key], value, rtol=0, atol=0, msg=key)  # ranks identical
        torch.testing.assert_close(value, single.policy.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)
    assert (tmp_path / "ddp" / "checkpoints" / "latest.pt").is_file()


def test_train_py_runs_end_to_end_and_reports_bad_dataset(linear_store, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = subprocess.run(
        [sys.executable, "train.py", "task=dataset", f"task.dataset_path={linear_store}", "training.steps=5", "training.batch_size=8",
         "logger.mode=offline", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step=5" in run.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "wandb offline run directory missing"

    bad = subprocess.run(
        [sys.executable, "train.py", "task=dataset", f"task.dataset_path={tmp_path / 'nowhere.zarr'}", f"hydra.run.dir={tmp_path / 'bad'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "nowhere.zarr" in bad.stderr


@pytest.mark.slow
def test_training_compile_trains_to_the_eager_parameters(linear_store, tmp_path):
    overrides = [*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=3", "training.batch_size=8"]
    params = {}
    for compiled in (False, True):
        workspace = Workspace(make_cfg([*overrides, f"training.compile={compiled}"]), tmp_path / str(compiled))
        workspace.run()
        params[compiled] = _params(workspace.policy)
    for key, value in params[False].items():
        torch.testing.assert_close(params[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resume_continues_the_python_and_numpy_random_streams(linear_store, tmp_path, monkeypatch):
    """User code (an augmentation, a sampler) may draw from `random` and `np.random` at every step: a
    resumed run must draw exactly what the uninterrupted run drew at the same steps."""
    import random

    import numpy as np

    overrides = [*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=12", "training.batch_size=16",
                 "training.checkpoint_every=6", "training.val_every=6"]
    original_step, draws, stop_at = Workspace._train_step, [], []

    def drawing_step(self, batch):
        if stop_at and self.step == stop_at[0]:
            raise KeyboardInterrupt
        draws.append((self.step, random.random(), float(np.random.random())))
        return original_step(self, batch)

    monkeypatch.setattr(Workspace, "_train_step", drawing_step)
    Workspace(make_cfg(overrides), tmp_path / "straight").run()
    straight, draws[:] = list(draws), []
    stop_at.append(6)
    with pytest.raises(KeyboardInterrupt):
        Workspace(make_cfg(overrides), tmp_path / "interrupted").run()
    stop_at.clear()
    random.seed(12345), np.random.seed(12345)  # whatever the process did in between
    Workspace(make_cfg(overrides), tmp_path / "interrupted").run()
    assert [d[0] for d in draws] == list(range(12)) and len(straight) == 12
    assert draws[6:] == straight[6:]


@pytest.mark.parametrize("override,words", [
    ("training.batch_size=0", "training.batch_size=0"),
    ("training.steps=-5", "training.steps=-5"),
    ("training.lr=-1e-3", "training.lr=-0.001"),
    ("data.val_ratio=1.5", "data.val_ratio=1.5"),
    ("data.in_memory=sometimes", "data.in_memory='sometimes'"),
    ("data.batch_order=sorted", "one of random, chunked"),
    ("data.cache_mb=-1", "data.cache_mb=-1"),
    ("eval.n_envs=0", "eval.n_envs=0"),
    ("eval.n_episodes=-1", "eval.n_episodes=-1"),
    ("training.num_threads=0", "training.num_threads=0"),
    ("training.lr_scheduler=cosinus", "one of"),
    ("training.betas=[0.9,1.5]", "training.betas"),
    ("device=gpu", "device='gpu'"),
    ("logger.mode=sometimes", "logger.mode"),
    ("task.dataset_path=/nonexistent/demos.zarr", "does not exist"),
])
def test_bad_config_values_are_one_sentence_and_exit_1(linear_store, override, words, tmp_path):
    from il_policies.training.validate import ConfigError

    overrides = [*BC_SMALL, f"task.dataset_path={linear_store}", override]
    with pytest.raises(ConfigError) as e:
        Workspace(make_cfg(overrides), tmp_path)
    message = str(e.value)
    assert "\n" not in message and words in message and message.startswith("config value "), message


def test_cuda_on_a_machine_without_a_gpu_names_what_torch_found(monkeypatch):
    from il_policies.training.validate import ConfigError, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' is invalid: torch .* finds no CUDA GPU") as e:
        check_device("cuda")
    assert "\n" not in str(e.value)
    check_device("cpu"), check_device("auto")


def test_train_py_refuses_a_bad_value_in_one_line(linear_store, tmp_path):
    run = subprocess.run([sys.executable, "train.py", *BC_SMALL, "task=dataset", f"task.dataset_path={linear_store}",
                          "training.batch_size=0", "logger.mode=disabled", f"hydra.run.dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "error: config value training.batch_size=0 is invalid: it must be a positive integer."], run.stderr[-2000:]


def test_metrics_jsonl_keeps_every_logged_step_and_the_wall_time_across_a_resume(linear_store, tmp_path, monkeypatch):
    import json

    from il_policies.benchmark.plan import read_curves

    overrides = [*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=20", "training.batch_size=8",
                 "training.log_every=5", "training.val_every=10", "training.checkpoint_every=10"]
    run_until_interrupted(overrides, tmp_path, 15, monkeypatch)
    before = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checkpoint_elapsed = read_checkpoint(tmp_path / "checkpoints/latest.pt")["train_state"]["elapsed_s"]
    summary = Workspace(make_cfg(overrides), tmp_path).run()
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in before] == [5, 10, 10, 15]  # step 10: the training row, then validation's
    assert [row["step"] for row in curves] == [5, 10, 15, 20]  # the rows of one step merged
    assert "val/loss" in curves[1] and "train/loss" in curves[1] and curves[-1]["val/loss"] == summary["val/loss"]
    elapsed = [row["elapsed_s"] for row in curves]
    assert elapsed == sorted(elapsed) and curves[3]["elapsed_s"] >= checkpoint_elapsed >= curves[2]["elapsed_s"] > 0


def test_loss_terms_are_measured_on_both_splits_at_the_end_without_touching_the_rng(linear_store, tmp_path):
    overrides = [*BC_SMALL, f"task.dataset_path={linear_store}", "training.steps=10", "training.batch_size=8",
                 "data.val_ratio=0.34"]
    plain = Workspace(make_cfg(overrides), tmp_path / "plain")
    plain_summary = plain.run()
    measured = Workspace(make_cfg([*overrides, "eval.loss_terms=true"]), tmp_path / "measured")
    summary = measured.run()
    assert {"terms/train/action_mse", "terms/val/action_mse", "terms/train/action_supervised"} <= set(summary)
    assert summary["terms/val/action_mse"] == pytest.approx(summary["val/action_mse"], rel=1e-6)  # the same split and weights
    assert summary["terms/train/action_mse"] != summary["terms/val/action_mse"]
    assert summary["val/loss"] == plain_summary["val/loss"] and "terms/train/loss" not in plain_summary
    for key, value in _params(plain.policy).items():  # measuring changed nothing the run computes
        torch.testing.assert_close(_params(measured.policy)[key], value, rtol=0, atol=0, msg=key)
