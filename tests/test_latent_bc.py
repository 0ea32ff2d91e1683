"""The sequence-VAE world model and the latent BC policy on it (issue 16). The registry-wide properties
(training, save/load, the action queue, clipping, export) are in test_policies.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from il_policies import load_policy, make_policy
from il_policies.data.dataset import SequenceDataset, collate_batch, prepare_batch
from il_policies.data.sampler import split_episodes
from il_policies.nn.vae import KLSchedule, gaussian_kl_between
from il_policies.nn.world_model import SequenceVAE, TeacherForcingSchedule
from il_policies.training import Workspace
from tests.conftest import REPO, make_cfg
from tests.test_policies import policy_dataset, small_overrides

SMALL = small_overrides("latent_bc")


def small_model(skip_context: bool = True, low_dim: int = 2, change_mask: bool = False) -> SequenceVAE:
    torch.manual_seed(0)
    return SequenceVAE(3, 16, low_dim, action_dim=2, latent_dim=4, channels=(4, 8), feature_dim=16, hidden_dim=16,
                       skip_context=skip_context, change_mask=change_mask)


def frames(batch: int = 2, steps: int = 5, low_dim: int = 2):
    torch.manual_seed(1)
    return torch.randn(batch, steps, 3, 16, 16), torch.randn(batch, steps, low_dim), torch.randn(batch, steps - 1, 2)


def test_shapes_of_the_filter_dynamics_and_decoder():
    model, (image, low, actions) = small_model(), frames()
    features, skips = model.encode(image, low)
    assert features.shape == (2, 5, 16) and [s.shape for s in skips] == [(2, 5, 4, 8, 8), (2, 5, 8, 4, 4)]
    mu, std, logvar = model.posterior(features)
    assert mu.shape == std.shape == logvar.shape == (2, 5, 4) and (std > 0).all()
    assert model.transition(mu[:, :-1], actions)[0].shape == (2, 4, 4)
    decoded_image, decoded_low = model.decode(mu, image[:, 0], [s[:, 0] for s in skips])
    assert decoded_image.shape == image.shape and decoded_low.shape == low.shape


def test_kl_between_gaussians_matches_a_hand_computation():
    mu_q, logvar_q = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, math.log(4.0)]])
    mu_p, logvar_p = torch.tensor([[0.0, 1.0]]), torch.tensor([[math.log(2.0), 0.0]])
    # per dimension: log(s_p / s_q) + (s_q^2 + (mu_q - mu_p)^2) / (2 s_p^2) - 1/2
    dim0 = 0.5 * math.log(2.0) + (1.0 + 0.25) / 4.0 - 0.5
    dim1 = -math.log(2.0) + (4.0 + 4.0) / 2.0 - 0.5
    assert gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p).item() == pytest.approx(dim0 + dim1, rel=1e-6)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(mu_q, (0.5 * logvar_q).exp()),
                                                  torch.distributions.Normal(mu_p, (0.5 * logvar_p).exp())).sum(-1)
    torch.testing.assert_close(gaussian_kl_between(mu_q, logvar_q, mu_p, logvar_p), reference)
    assert gaussian_kl_between(mu_q, logvar_q, mu_q, logvar_q).abs().max() < 1e-7


def test_the_filter_is_causal():
    """z_t depends on o_1..o_t only: changing frame 3 changes no posterior before it, and changes step 3's."""
    model, (image, low, _) = small_model(), frames()
    before = model.posterior(model.encode(image, low)[0])[0]
    image, low = image.clone(), low.clone()
    image[:, 3] += 1.0
    low[:, 3] -= 1.0
    after = model.posterior(model.encode(image, low)[0])[0]
    torch.testing.assert_close(after[:, :3], before[:, :3], rtol=0, atol=0)
    assert (after[:, 3:] - before[:, 3:]).abs().amax(dim=-1).min() > 0


def test_teacher_forcing_at_ratio_one_is_the_one_step_model():
    model, (image, low, actions) = small_model(), frames()
    z = model.posterior(model.encode(image, low)[0])[0]
    teacher = torch.ones(2, 4, dtype=torch.bool)
    mu, logvar = model.predict(z, actions, teacher)
    one_step_mu, _, one_step_logvar = model.transition(z[:, :-1], actions)
    torch.testing.assert_close(mu, one_step_mu)
    torch.testing.assert_close(logvar, one_step_logvar)
    # Ratio 0: one open-loop chain from z_1, the same as imagining from the first frame.
    open_mu, _ = model.predict(z, actions, torch.zeros_like(teacher))
    chain = z[:, 0]
    for t in range(4):
        chain = model.transition(chain, actions[:, t])[0]
        torch.testing.assert_close(open_mu[:, t], chain)
    assert not torch.allclose(open_mu[:, 1:], mu[:, 1:])


@pytest.mark.parametrize("change_mask", [False, True])
def test_an_untrained_context_decoder_draws_the_last_context_frame(change_mask):
    """The decoder draws o_c plus a change that starts at 0, so imagination begins at copy-the-last-frame."""
    model, (image, low, actions) = small_model(change_mask=change_mask), frames()
    imagined_image, imagined_low = model.imagine(image[:, :3], low[:, :3], actions[:, 2:4])
    torch.testing.assert_close(imagined_image, image[:, 2:3].expand(-1, 2, -1, -1, -1))
    plain = small_model(skip_context=False).imagine(image[:, :3], low[:, :3], actions[:, 2:4])[0]
    assert plain.shape == imagined_image.shape and not torch.allclose(plain, imagined_image)


def test_the_change_mask_gates_the_change_per_pixel():
    """o_t = o_c + sigmoid(m) * change: a closed mask (m -> -inf) gives o_c, an open one the unmasked change."""
    masked, plain, (image, low, _) = small_model(change_mask=True), small_model(), frames()
    skips = masked.encode(image, low)[1]
    last_masked, last_plain = masked.decoder.ups[-1], plain.decoder.ups[-1]
    assert last_masked.out_channels == last_plain.out_channels + 1 == 4
    torch.manual_seed(2)
    with torch.no_grad():
        last_plain.weight.normal_(std=0.1)
        last_plain.bias.normal_(std=0.1)
        plain.load_state_dict({k: v for k, v in masked.state_dict().items() if not k.startswith("decoder.ups.1")}, strict=False)
        last_masked.weight.zero_()
        last_masked.weight[:, :3].copy_(last_plain.weight)
        last_masked.bias[:3].copy_(last_plain.bias)
    z, context = torch.randn(2, 5, 4), (image[:, 0], [s[:, 0] for s in skips])
    for bias, expected in ((-60.0, image[:, 0].unsqueeze(1).expand(-1, 5, -1, -1, -1)), (60.0, plain.decode(z, *context)[0])):
        with torch.no_grad():
            last_masked.bias[3] = bias
        torch.testing.assert_close(masked.decode(z, *context)[0], expected)


def test_schedules():
    tf = TeacherForcingSchedule(start=1.0, end=0.2, decay_start=100, decay_steps=400)
    assert [tf(s) for s in (0, 100, 300, 500, 10_000)] == pytest.approx([1.0, 1.0, 0.6, 0.2, 0.2])
    with pytest.raises(ValueError, match="teacher forcing ratios"):
        TeacherForcingSchedule(end=1.5)
    cyclical = KLSchedule("cyclical", weight=1.0, cycle_steps=100, ramp_fraction=0.5)
    assert [cyclical(s) for s in (0, 25, 50, 99, 100, 125)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0, 0.5])


def test_bad_options_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="frame_size 60 must be a multiple of 2\\^4"):
        make_cfg_policy(["policy.frame_size=60"])
    with pytest.raises(ValueError, match="unknown loss term"):
        make_cfg_policy(["+policy.loss_weights.reward=1"])


def make_cfg_policy(overrides):
    from il_policies.policies.registry import make_config

    return make_config(make_cfg(["policy=latent_bc", *overrides]).policy)


def test_episode_starts_are_masked_and_take_the_standard_normal_prior(image_store):
    """Windows that begin before an episode's first step repeat its first frame: those steps carry no
    loss, so the loss of such a window does not change when the repeated frames' actions do."""
    cfg = make_cfg([*SMALL, "policy.n_obs_steps=4", "policy.horizon=2", "policy.n_action_steps=1"])
    dataset = policy_dataset(image_store, cfg)
    policy = make_policy(cfg.policy, dataset.shape_meta)
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    batch = prepare_batch(collate_batch(dataset.__getitems__([1])), dataset.shape_meta, "cpu")  # step 1: 2 steps before the start
    assert batch["action_is_pad"][0].tolist() == [True, True, False, False, False]
    policy.eval()
    torch.manual_seed(0)
    reference = policy.loss_terms(batch)
    batch["action"][:, :2] += 5.0  # the clamped actions of the padded steps
    torch.manual_seed(0)
    changed = policy.loss_terms(batch)
    for term in ("recon", "kl", "prediction", "action"):
        assert changed[term].item() == pytest.approx(reference[term].item(), rel=1e-6), term


def test_a_dataset_in_other_windows_is_refused(image_store):
    cfg = make_cfg([*SMALL, "policy.n_obs_steps=3", "policy.horizon=2", "policy.n_action_steps=1"])
    dataset = SequenceDataset.from_store(image_store, n_obs_steps=3, horizon=2)
    policy = make_policy(cfg.policy, dataset.shape_meta)
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    batch = prepare_batch(collate_batch(dataset.__getitems__([5, 6])), dataset.shape_meta, "cpu")
    with pytest.raises(ValueError, match="trains on windows of 4 actions"):
        policy.compute_loss(batch)


def test_imagine_command_writes_curves_metrics_and_a_gif(image_store, tmp_path):
    cfg = make_cfg([*SMALL, f"task.dataset_path={image_store}", "training.steps=2", "training.batch_size=4", "data.val_ratio=0.5",
                    "eval.loss_terms=true", "eval.imagine_context=3", "eval.imagine_predict=6"])
    summary = Workspace(cfg, tmp_path / "run").run()
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert (tmp_path / "run" / "visualizations" / "step_2" / "imagination.png").is_file()  # logged at each validation
    out = tmp_path / "imagine"
    done = subprocess.run([sys.executable, "eval/imagine.py", f"checkpoint={checkpoint}", "n_context=3", "n_predict=6", "stride=4",
                           "n_videos=2", f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    held_out = split_episodes(4, 0.5, cfg.seed)[1].tolist()  # the run's split
    assert metrics["episodes"] == held_out and metrics["n_windows"] == 2 * 3  # 2 episodes of 20 steps, starts 0, 4, 8
    assert len(metrics["psnr"]) == len(metrics["copy_last_ssim"]) == 6 and all(math.isfinite(v) for v in metrics["psnr"])
    assert (out / "psnr_ssim.png").stat().st_size > 0 and (out / "imagination.gif").stat().st_size > 0
    # The end-of-run hook (eval.loss_terms) scored the same kind of prediction on the held-out episodes.
    assert {f"imagine/{m}_{k}" for m in ("psnr", "ssim", "copy_last_psnr") for k in range(1, 7)} <= set(summary)
    assert summary["imagine/psnr_gain_min"] <= summary["imagine/psnr_1"] - summary["imagine/copy_last_psnr_1"] + 1e-3  # (4 decimals)
    assert load_policy(checkpoint).name == "latent_bc"
    refused = subprocess.run([sys.executable, "eval/imagine.py", f"checkpoint={checkpoint}", "n_predict=30", f"hydra.run.dir={out}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "fewer than n_context + n_predict = 35" in refused.stderr


def test_a_term_with_weight_zero_costs_nothing_in_training_and_is_still_measured(image_store):
    cfg = make_cfg([*SMALL, "policy.loss_weights.recon=0", "policy.loss_weights.prediction=0", "policy.kl_schedule.weight=0"])
    dataset = policy_dataset(image_store, cfg)
    policy = make_policy(cfg.policy, dataset.shape_meta)
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    batch = prepare_batch(collate_batch(dataset.__getitems__([3, 4, 5])), dataset.shape_meta, "cpu")
    loss, metrics = policy.compute_loss(batch)
    loss.backward()
    assert "recon" not in metrics and "prediction" not in metrics  # not computed: BC through the filter alone
    assert all(p.grad is None for p in [*policy.world_model.decoder.parameters(), *policy.world_model.dynamics.parameters()])
    assert loss.item() == pytest.approx(metrics["action"])
    policy.eval()
    assert {"recon", "prediction", "kl", "action", "psnr_open_loop"} <= set(policy.compute_loss(batch)[1])
