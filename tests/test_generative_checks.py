"""The decoder checks (il_policies/generative_checks.py): exact values on decoders whose answer is
known, and the Workspace hook that reports them with `eval.loss_terms=true`."""

from __future__ import annotations

import math

import pytest
import torch

from il_policies.generative_checks import decoder_checks, training_mean
from il_policies.training import Workspace
from tests.conftest import make_cfg
from tests.test_bvae import TINY_IMAGE, policy_from_yaml

# obs has the action's dimension, so a decoder can be the identity
META = {"obs": {"state": {"shape": (3,), "kind": "low_dim"}}, "action": {"shape": (3,)}}


def batches(policy, n_batches=3, size=16, seed=0):
    """Batches whose normalized observation equals their normalized action."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        action = torch.randn(size, 1, 3, generator=g) * 2 + 1
        state = policy.normalizer.unnormalize("state", policy.normalizer.normalize("action", action))
        out.append({"obs": {"state": state}, "action": action})
    return out


def with_networks(policy, decode, encode):
    policy.vae.decode = decode
    policy.vae.encode = encode
    return policy


def identity_encode(packed):
    low = packed["low_dim"]
    return torch.cat([low, torch.zeros_like(low)], dim=-1)


def test_an_exact_inverse_pair_scores_one_everywhere():
    policy = policy_from_yaml("bvae", META)
    with_networks(policy, lambda z: ({"low_dim": z.clone()}, {"low_dim": torch.zeros_like(z)}), identity_encode)
    train, val = batches(policy, seed=0), batches(policy, seed=1)
    checks = decoder_checks(policy, lambda: train, lambda: val)
    assert checks["generative/decoded_explained/low_dim"] == pytest.approx(1.0, abs=1e-6)
    assert checks["generative/decoded_explained_train/low_dim"] == pytest.approx(1.0, abs=1e-6)
    for i in range(3):
        assert checks[f"generative/traversal/slope_{i}"] == pytest.approx(1.0, abs=1e-5)
    # one SD along one of 3 coordinates moves the decoded vector by 1/sqrt(3) RMS, against the data's RMS spread
    mean = training_mean(policy, train)["low_dim"]
    spread = torch.cat([policy.vae.pack(policy.normalize_obs(b["obs"]))["low_dim"] for b in val]).sub(mean).square().mean().sqrt()
    assert checks["generative/traversal/change_low_dim"] == pytest.approx(1 / math.sqrt(3) / spread.item(), rel=1e-4)


def test_a_decoder_that_ignores_its_input_scores_zero():
    policy = policy_from_yaml("bvae", META)
    train, val = batches(policy, seed=0), batches(policy, seed=1)
    mean = training_mean(policy, train)["low_dim"]
    with_networks(policy, lambda z: ({"low_dim": mean.expand(z.shape[0], -1).clone()}, {"low_dim": torch.zeros_like(z)}),
                  identity_encode)
    checks = decoder_checks(policy, lambda: train, lambda: val)
    assert checks["generative/decoded_explained/low_dim"] == pytest.approx(0.0, abs=1e-6)
    assert checks["generative/decoded_explained_train/low_dim"] == pytest.approx(0.0, abs=1e-6)  # the mean itself
    assert checks["generative/traversal/slope"] == pytest.approx(0.0, abs=1e-6)
    assert checks["generative/traversal/change_low_dim"] == 0.0


def test_an_invisible_code_is_told_apart_from_a_visible_edit():
    # D hides z in a tiny perturbation of the mean and E reads it back: the slope is 1, the change ~0.
    policy = policy_from_yaml("bvae", META)
    train, val = batches(policy, seed=0), batches(policy, seed=1)
    mean = training_mean(policy, train)["low_dim"]
    with_networks(policy, lambda z: ({"low_dim": mean + 1e-4 * z}, {"low_dim": torch.zeros_like(z)}),
                  lambda packed: identity_encode({"low_dim": (packed["low_dim"] - mean) / 1e-4}))
    checks = decoder_checks(policy, lambda: train, lambda: val)
    assert checks["generative/traversal/slope"] == pytest.approx(1.0, abs=1e-2)
    assert checks["generative/traversal/change_low_dim"] < 1e-3
    assert checks["generative/decoded_explained/low_dim"] == pytest.approx(0.0, abs=1e-3)


def test_the_checks_leave_the_policy_in_its_mode_and_unchanged():
    policy = policy_from_yaml("bvae", META).train()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    decoder_checks(policy, lambda: batches(policy, seed=0), lambda: batches(policy, seed=1))
    assert policy.training
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["bvae", "vae_nn"])
def test_the_workspace_reports_the_checks_with_the_loss_terms(name, image_store, tmp_path):
    options = [f"policy.{k}={list(v) if isinstance(v, list) else v}".replace(" ", "") for k, v in TINY_IMAGE.items()]
    cfg = make_cfg([f"policy={name}", *options, f"task.dataset_path={image_store}", "training.steps=2",
                    "training.batch_size=8", "eval.loss_terms=true"])
    summary = Workspace(cfg, tmp_path).run()
    keys = {"generative/decoded_explained/image", "generative/decoded_explained/low_dim", "generative/traversal/slope",
            "generative/traversal/change_image"}
    assert keys <= set(summary)
    assert all(math.isfinite(summary[k]) for k in keys)
