"""One source of truth for configs: structured configs (Hydra refuses bad keys and types), policy
training presets overridden by `training.*`, configs rebuilt from checkpoints without Hydra."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from il_policies.nn.vae import KLSchedule
from il_policies.policies.registry import make_config
from il_policies.training import Workspace
from tests.conftest import REPO, make_cfg


@pytest.mark.parametrize("override", ["policy.colour=3", "training.stepz=5", "policy.kl_schedule.wieght=1"])
def test_unknown_keys_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{key}'"):
        make_cfg(["policy=act" if "kl_schedule" in override else "policy=bc", override])


@pytest.mark.parametrize("override", ["training.steps=many", "policy.hidden_dims=wide", "policy.training_preset.lr=fast"])
def test_values_of_the_wrong_type_are_refused(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make_cfg([override])


def test_train_py_refuses_a_bad_key_before_doing_anything(tmp_path):
    for override, says in (("policy.colour=3", "Key 'colour' not in 'BCConfig'"), ("+policy.colour=3", "has no option(s) ['colour']")):
        run = subprocess.run([sys.executable, "train.py", "task=metaworld_push", f"task.dataset_path={tmp_path / 'never.zarr'}",
                              override, f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and says in run.stderr, run.stderr[-2000:]
        assert not (tmp_path / "never.zarr").exists()  # refused before generating demonstrations


def test_policy_yaml_files_hold_only_what_differs_from_the_dataclass():
    # bvae_original differs from bvae in the listed options only; every other value is the dataclass default.
    original = OmegaConf.to_container(make_cfg(["policy=bvae_original"]).policy)
    default = OmegaConf.to_container(make_cfg(["policy=bvae"]).policy)
    assert make_config(default) == make_config({"name": "bvae"})
    changed = {key for key in default if original[key] != default[key]}
    assert changed == {"kl_schedule", "scale", "noise_scale", "norm", "upsample_sizes", "output_activation",
                       "image_norm_per_pixel", "training_preset"}
    assert make_cfg(["policy=bc_conv_vae"]).policy.name == "bc"


def test_config_from_a_checkpoint_dict_rebuilds_nested_dataclasses_and_tuples():
    config = make_config({"name": "act", "conv_channels": [8, 16], "kl_schedule": {"kind": "linear", "weight": 2.0},
                          "training_preset": {"lr": 3e-4, "ema": {"enabled": True}}})
    assert config.conv_channels == (8, 16) and isinstance(config.kl_schedule, KLSchedule)
    assert config.kl_schedule(500) == pytest.approx(1.0) and config.training_preset.ema.enabled
    assert make_config(asdict(config)) == config
    with pytest.raises(ValueError, match="unknown KL schedule"):
        make_config({"name": "act", "kl_schedule": {"kind": "sometimes"}})


def _built(linear_store, *overrides) -> Workspace:
    workspace = Workspace(make_cfg([f"task.dataset_path={linear_store}", "training.steps=10", *overrides]), "/nonexistent")
    workspace._build()
    return workspace


def test_the_policy_training_preset_drives_the_optimizer_and_training_overrides_it(linear_store):
    act = ["policy=act", "policy.backbone=conv", "policy.d_model=16", "policy.n_heads=2", "policy.dim_feedforward=16",
           "policy.n_encoder_layers=1", "policy.n_vae_encoder_layers=1", "policy.horizon=4", "policy.n_action_steps=4"]
    workspace = _built(linear_store, *act)
    assert (workspace.preset.lr, workspace.preset.weight_decay, workspace.preset.grad_clip) == (1e-5, 1e-4, 0.0)
    assert workspace.optimizer.param_groups[0]["lr"] == 1e-5 and workspace.optimizer.param_groups[0]["weight_decay"] == 1e-4
    metrics = workspace._train_step(next(workspace._batches()))
    assert "grad_norm" not in metrics  # the original clips nothing
    assert metrics["lr"] == workspace.lr_scheduler.get_last_lr()[0] == 1e-5  # constant, no warm-up

    overridden = _built(linear_store, *act, "training.lr=3e-4", "training.betas=[0.95,0.999]", "training.grad_clip=1.0",
                        "training.lr_scheduler=cosine", "training.lr_warmup_steps=5", "training.ema.enabled=true")
    assert overridden.optimizer.param_groups[0]["lr"] == 0.0  # warm-up from 0
    assert overridden.optimizer.param_groups[0]["betas"] == (0.95, 0.999) and overridden.ema is not None
    assert overridden.preset.weight_decay == 1e-4  # not overridden: the policy's
    assert overridden._train_step(next(overridden._batches()))["grad_norm"] > 0

    bc = _built(linear_store, "policy=bc")
    assert (bc.preset.lr, bc.preset.lr_scheduler, bc.preset.lr_warmup_steps, bc.preset.grad_clip) == (1e-3, "cosine", 100, 10.0)


def test_select_action_puts_the_policy_in_eval_mode(linear_store):
    policy = _built(linear_store, "policy=bc", "policy.dropout=0.5").policy.train()
    first = policy.select_action({"state": torch.ones(5)})
    assert not policy.training
    policy.reset()
    assert torch.equal(policy.select_action({"state": torch.ones(5)}), first)  # no dropout at inference
