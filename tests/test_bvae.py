"""BVAE and VAE+NN: loss terms by hand, gradient routing, the original network, pictures, a real task."""

from __future__ import annotations

import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from il_policies import load_policy, make_policy
from il_policies.nn.conv_vae import ConvImageDecoder, ConvImageEncoder, count_parameters, original_bvae_networks
from il_policies.training import Workspace
from tests.conftest import REPO, make_cfg

LOW_META = {"obs": {"state": {"shape": (5,), "kind": "low_dim"}}, "action": {"shape": (3,)}}
IMAGE_META = {"obs": {"image": {"shape": (3, 16, 16), "kind": "rgb"}, "agent_pos": {"shape": (2,), "kind": "low_dim"}},
              "action": {"shape": (2,)}}
TINY_IMAGE = {"conv_channels": [4, 4, 8, 8], "hidden_dim": 8}


def policy_from_yaml(yaml: str, meta, **options):
    cfg = OmegaConf.to_container(make_cfg([f"policy={yaml}"]).policy)
    policy = make_policy({**cfg, **options}, meta)
    rng = np.random.default_rng(0)
    data = {"action": rng.normal(1.0, 2.0, size=(50, meta["action"]["shape"][0]))}
    for key, m in meta["obs"].items():
        if m["kind"] == "rgb":
            c, h, w = m["shape"]
            data[key] = rng.integers(0, 256, size=(50, h, w, c), dtype=np.uint8)
        else:
            data[key] = rng.normal(-1.0, 3.0, size=(50, *m["shape"]))
    policy.normalizer.fit(data)
    return policy


def random_batch(meta, batch=4, n_obs_steps=1, horizon=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for key, m in meta["obs"].items():
        if m["kind"] == "rgb":
            obs[key] = torch.rand(batch, n_obs_steps, *m["shape"], generator=g)
        else:
            obs[key] = torch.randn(batch, n_obs_steps, *m["shape"], generator=g) * 3 - 1
    action = torch.randn(batch, horizon, meta["action"]["shape"][0], generator=g) * 2 + 1
    is_pad = torch.zeros(batch, horizon, dtype=torch.bool)
    is_pad[0, -1] = horizon > 1  # one padded step, to check the mask
    return {"obs": obs, "action": action, "action_is_pad": is_pad}


@pytest.fixture
def fixed_noise(monkeypatch):
    """torch.randn_like -> a fixed, non-trivial function of the shape, so a hand computation sees the same eps."""

    def noise(x, *args, **kwargs):
        return torch.linspace(-1.5, 1.2, x.numel(), dtype=x.dtype).reshape(x.shape)

    monkeypatch.setattr(torch, "randn_like", noise)
    return noise


# ---- loss terms by hand -------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["softplus", "logvar", "raw"])
def test_low_dim_loss_terms_equal_a_hand_computation(fixed_noise, scale):
    policy = policy_from_yaml("bvae", LOW_META, scale=scale, noise_scale=0.7, horizon=2, n_action_steps=2, n_obs_steps=2,
                              mlp_hidden_dims=[16])
    batch = random_batch(LOW_META, n_obs_steps=2, horizon=2)
    terms = policy.loss_terms(batch)

    E, D, norm = policy.vae.encoder.net, policy.vae.decoder.net, policy.normalizer
    std_of = {"softplus": lambda r: F.softplus(r) + 1e-4, "logvar": lambda r: torch.exp(0.5 * r.clamp(-20, 10)), "raw": lambda r: r}[scale]
    o = norm.normalize("state", batch["obs"]["state"]).reshape(4, 10)
    a = norm.normalize("action", batch["action"]).reshape(4, 6)
    keep = (~batch["action_is_pad"]).repeat_interleave(3, dim=1).float()  # (B, H*A)

    def action_mse(x):
        return ((x - a) ** 2 * keep).sum() / keep.sum()

    mu_a, raw_a = E(o).chunk(2, dim=-1)
    z = mu_a + std_of(raw_a) * fixed_noise(mu_a) * 0.7
    mu_o, raw_o = D(z).chunk(2, dim=-1)
    o_hat = mu_o + std_of(raw_o) * fixed_noise(mu_o) * 0.7
    mu_o2, raw_o2 = D(a).chunk(2, dim=-1)
    o_tilde = mu_o2 + std_of(raw_o2) * fixed_noise(mu_o2) * 0.7
    mu_a2, raw_a2 = E(o_tilde).chunk(2, dim=-1)
    a_tilde = mu_a2 + std_of(raw_a2) * fixed_noise(mu_a2) * 0.7
    var = std_of(raw_a) ** 2
    expected = {
        "action_supervised": action_mse(mu_a),
        "obs_supervised": ((mu_o2 - o) ** 2).mean(),
        "obs_recon": ((o_hat - o) ** 2).mean(),
        "action_recon": action_mse(a_tilde),
        "kl": (0.5 * (mu_a**2 + var - torch.log(var) - 1)).sum(-1).mean(),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, msg=name)


def test_image_loss_terms_average_the_image_and_low_dim_groups(fixed_noise):
    policy = policy_from_yaml("bvae", IMAGE_META, **TINY_IMAGE)
    batch = random_batch(IMAGE_META)
    terms = policy.loss_terms(batch)
    norm, enc, dec = policy.normalizer, policy.vae.encoder, policy.vae.decoder
    image = norm.normalize("image", batch["obs"]["image"])[:, 0]
    low = norm.normalize("agent_pos", batch["obs"]["agent_pos"])[:, 0]
    a = norm.normalize("action", batch["action"])[:, 0]
    std = lambda r: F.softplus(r) + 1e-4  # noqa: E731

    mu_a, raw_a = enc(image, low).chunk(2, dim=-1)
    z = mu_a + std(raw_a) * fixed_noise(mu_a)
    img, lo = dec(z)
    img_hat = img[:, :3] + std(img[:, 3:]) * fixed_noise(img[:, 3:])
    lo_hat = lo[:, :2] + std(lo[:, 2:]) * fixed_noise(lo[:, 2:])
    expected_recon = 0.5 * (((img_hat - image) ** 2).mean() + ((lo_hat - low) ** 2).mean())
    img2, lo2 = dec(a)
    expected_sup = 0.5 * (((img2[:, :3] - image) ** 2).mean() + ((lo2[:, :2] - low) ** 2).mean())
    img_t = img2[:, :3] + std(img2[:, 3:]) * fixed_noise(img2[:, 3:])
    lo_t = lo2[:, :2] + std(lo2[:, 2:]) * fixed_noise(lo2[:, 2:])
    mu_a2, raw_a2 = enc(img_t, lo_t).chunk(2, dim=-1)
    a_tilde = mu_a2 + std(raw_a2) * fixed_noise(mu_a2)
    torch.testing.assert_close(terms["action_supervised"], ((mu_a - a) ** 2).mean())
    torch.testing.assert_close(terms["obs_recon"], expected_recon)
    torch.testing.assert_close(terms["obs_supervised"], expected_sup)
    torch.testing.assert_close(terms["action_recon"], ((a_tilde - a) ** 2).mean())


def test_total_loss_weights_terms_and_the_scheduled_kl():
    policy = policy_from_yaml("bvae", LOW_META, mlp_hidden_dims=[16],
                              loss_weights={"action_supervised": 2.0, "obs_supervised": 0.5, "obs_recon": 0.25, "action_recon": 3.0},
                              kl_schedule={"kind": "linear", "weight": 0.1, "warmup_steps": 10})
    batch = random_batch(LOW_META)
    policy.set_training_step(5)
    torch.manual_seed(0)
    loss, metrics = policy.compute_loss(batch)
    assert metrics["kl_weight"] == pytest.approx(0.05)
    expected = (2.0 * metrics["action_supervised"] + 0.5 * metrics["obs_supervised"] + 0.25 * metrics["obs_recon"]
                + 3.0 * metrics["action_recon"] + 0.05 * metrics["kl"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(metrics) == {"action_supervised", "obs_supervised", "obs_recon", "action_recon", "kl", "kl_weight"}
    policy.set_training_step(1000)
    assert policy.compute_loss(batch)[1]["kl_weight"] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["bvae", "vae_nn"])
def test_kl_weight_follows_the_configured_schedule(name):
    policy = policy_from_yaml(name, LOW_META, mlp_hidden_dims=[16],
                              kl_schedule={"kind": "cyclical", "weight": 0.2, "cycle_steps": 100, "ramp_fraction": 0.5})
    batch = random_batch(LOW_META)
    weights = []
    for step in (0, 25, 50, 99, 100, 125):
        policy.set_training_step(step)
        weights.append(policy.compute_loss(batch)[1]["kl_weight"])
    assert weights == pytest.approx([0.0, 0.1, 0.2, 0.2, 0.0, 0.1])
    with pytest.raises(ValueError, match="cycle_steps"):
        policy_from_yaml(name, LOW_META, kl_schedule={"kind": "cyclical", "cycle_steps": 0})


def test_vae_nn_loss_terms_equal_a_hand_computation(fixed_noise):
    policy = policy_from_yaml("vae_nn", LOW_META, mlp_hidden_dims=[16], kl_schedule={"kind": "constant", "weight": 0.3})
    batch = random_batch(LOW_META)
    loss, metrics = policy.compute_loss(batch)
    o = policy.normalizer.normalize("state", batch["obs"]["state"])[:, 0]
    a = policy.normalizer.normalize("action", batch["action"])[:, 0]
    mu, raw = policy.vae.encoder.net(o).chunk(2, dim=-1)
    std = F.softplus(raw) + 1e-4
    mu_o, raw_o = policy.vae.decoder.net(mu + std * fixed_noise(mu)).chunk(2, dim=-1)
    o_hat = mu_o + (F.softplus(raw_o) + 1e-4) * fixed_noise(mu_o)
    recon = ((o_hat - o) ** 2).mean()
    kl = (0.5 * (mu**2 + std**2 - torch.log(std**2) - 1)).sum(-1).mean()
    supervised = ((policy.head(mu) - a) ** 2).mean()
    torch.testing.assert_close(loss, recon + supervised + 0.3 * kl)
    assert metrics["obs_recon"] == pytest.approx(recon.item(), rel=1e-5)
    assert metrics["action_supervised"] == pytest.approx(supervised.item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(kl.item(), rel=1e-5)


# ---- gradient routing ---------------------------------------------------------------------------
def _reaches(term: torch.Tensor, module: torch.nn.Module) -> bool:
    grads = torch.autograd.grad(term, list(module.parameters()), retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("meta", [LOW_META, IMAGE_META], ids=["low_dim", "image"])
def test_each_term_reaches_exactly_the_networks_it_should(meta):
    policy = policy_from_yaml("bvae", meta, mlp_hidden_dims=[16], **TINY_IMAGE)
    terms = policy.loss_terms(random_batch(meta))
    E, D = policy.vae.encoder, policy.vae.decoder
    expected = {"action_supervised": (True, False), "obs_supervised": (False, True), "obs_recon": (True, True),
                "action_recon": (True, True), "kl": (True, False)}
    for name, (to_e, to_d) in expected.items():
        assert (_reaches(terms[name], E), _reaches(terms[name], D)) == (to_e, to_d), name


def test_bc_baseline_is_the_registry_bc_with_exactly_bvaes_encoder():
    bc = policy_from_yaml("bc_conv_vae", IMAGE_META, **TINY_IMAGE)
    bvae = policy_from_yaml("bvae", IMAGE_META, **TINY_IMAGE)
    assert bc.name == "bc"
    # Layer for layer BVAE's E; only the last linear layer is narrower: the action chunk instead of (mean, scale).
    bc_layers = [(type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for m in bc.obs_encoder.encoder.modules()]
    bvae_layers = [(type(m).__name__, tuple(p.shape for p in m.parameters(recurse=False))) for m in bvae.vae.encoder.modules()]
    assert bc_layers[:-1] == bvae_layers[:-1]
    assert bc.obs_encoder.encoder.head[-1].out_features * 2 == bvae.vae.encoder.head[-1].out_features
    batch = random_batch(IMAGE_META)
    loss, metrics = bc.compute_loss(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bc.parameters())
    # E's output IS the normalized action: the loss is its MSE against the normalized target.
    out = bc.obs_encoder.encode(bc.obs_encoder.pack(bc.normalizer.normalize_obs(batch["obs"])))
    target = bc.normalizer.normalize("action", batch["action"])[:, 0]
    assert loss.item() == pytest.approx(F.mse_loss(out, target).item(), rel=1e-5)


@pytest.mark.parametrize("two_stage", [False, True])
def test_vae_nn_two_stage_keeps_the_action_gradient_out_of_the_vae(two_stage):
    policy = policy_from_yaml("vae_nn", IMAGE_META, two_stage=two_stage, **TINY_IMAGE)
    terms = policy.loss_terms(random_batch(IMAGE_META))
    assert _reaches(terms["action_supervised"], policy.head)
    assert _reaches(terms["action_supervised"], policy.vae.encoder) == (not two_stage)
    assert not _reaches(terms["action_supervised"], policy.vae.decoder)
    assert _reaches(terms["obs_recon"], policy.vae.encoder) and _reaches(terms["obs_recon"], policy.vae.decoder)


# ---- architecture -------------------------------------------------------------------------------
def test_original_config_has_exactly_24520_parameters_at_224_with_a_7_dim_action():
    meta = {"obs": {"image": {"shape": (3, 224, 224), "kind": "rgb"}}, "action": {"shape": (7,)}}
    policy = policy_from_yaml("bvae_original", meta)
    assert count_parameters(policy) == 24_520  # normalizer statistics are buffers, not parameters
    encoder, decoder = original_bvae_networks(7)
    assert count_parameters(encoder) == 12_554 and count_parameters(decoder) == 11_966
    assert [type(m).__name__ for m in policy.vae.encoder.features] == [type(m).__name__ for m in encoder.features]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in policy.modules()) == 6
    image = torch.rand(2, 3, 224, 224)
    out = policy.vae.encoder(image)
    assert policy.vae.encoder.features(image).shape == (2, 192) and out.shape == (2, 14)
    assert policy.vae.decoder(out[:, :7])[0].shape == (2, 6, 224, 224)


@pytest.mark.parametrize("size", [24, 64, 84, 96, 224])
def test_the_family_reaches_any_declared_image_size_with_low_dim_inputs(size):
    encoder = ConvImageEncoder(6, size, out_dim=10, low_dim=3, norm="group")
    decoder = ConvImageDecoder(6, size, latent_dim=5, low_dim=3, norm="group", output_activation=False)
    out = encoder(torch.rand(2, 6, size, size), torch.randn(2, 3))
    image, low = decoder(out[:, :5])
    assert out.shape == (2, 10) and image.shape == (2, 12, size, size) and low.shape == (2, 6)


def test_inference_is_the_encoder_mean_in_raw_units_and_deterministic():
    policy = policy_from_yaml("bvae", IMAGE_META, **TINY_IMAGE).eval()
    obs = random_batch(IMAGE_META)["obs"]
    chunk = policy.predict_action_chunk(obs)
    normalized = {k: policy.normalizer.normalize(k, v) for k, v in obs.items()}
    with torch.no_grad():
        mu = policy.vae.encoder(normalized["image"][:, 0], normalized["agent_pos"][:, 0])[:, :2]
    torch.testing.assert_close(chunk[:, 0], policy.normalizer.unnormalize("action", mu))
    torch.testing.assert_close(policy.predict_action_chunk(obs), chunk, rtol=0, atol=0)


def test_raw_scale_of_the_original_gives_a_finite_loss_and_kl():
    meta = {"obs": {"image": {"shape": (3, 32, 32), "kind": "rgb"}}, "action": {"shape": (3,)}}
    policy = policy_from_yaml("bvae_original", meta, upsample_sizes=None)
    loss, metrics = policy.compute_loss(random_batch(meta))
    assert torch.isfinite(loss) and np.isfinite(metrics["kl"]) and metrics["kl_weight"] == 0.0


# ---- generative outputs -------------------------------------------------------------------------
def test_decode_action_and_the_traversal_grid_png(tmp_path):
    policy = policy_from_yaml("bvae", IMAGE_META, horizon=2, n_action_steps=2, **TINY_IMAGE).eval()
    batch = random_batch(IMAGE_META, horizon=2)
    decoded = policy.decode_action(batch["action"])
    assert decoded["image"].shape == (4, 1, 3, 16, 16) and decoded["agent_pos"].shape == (4, 1, 2)
    assert 0.0 <= decoded["image"].min() and decoded["image"].max() <= 1.0
    paths = policy.visualize(batch, tmp_path)
    assert [p.name for p in paths] == ["latent_traversal.png", "action_to_obs.png"]
    grid = imageio.imread(paths[0])
    rows, cols = 4, 1 + 5  # latent = horizon * action_dim; the real image, then -2..+2 SD
    bare_h, bare_w = rows * (16 + 2) + 2, cols * (16 + 2) + 2
    top, left = grid.shape[0] - bare_h, grid.shape[1] - bare_w  # labels above and to the left of the tiles
    assert top > 0 and left > 0 and grid.dtype == np.uint8
    assert (grid[:top] < 128).any() and (grid[top:, :left] < 128).any()  # text drawn in both margins
    # Moving a latent coordinate changes the decoded picture: tiles in a row differ.
    tile = lambda r, c: grid[top + 2 + r * 18 : top + 2 + r * 18 + 16, left + 2 + c * 18 : left + 2 + c * 18 + 16]  # noqa: E731
    assert any(not np.array_equal(tile(r, 1), tile(r, 5)) for r in range(rows))
    pairs = imageio.imread(paths[1])  # 2 rows x 4 samples, then one line per sample's action below
    assert pairs.shape[0] > 2 * 18 + 2 + 4 * 10 and pairs.shape[1] > 4 * 18 + 2


def test_grid_labels_name_the_coordinates_and_their_sds():
    from il_policies.visualization import latent_labels

    bvae = policy_from_yaml("bvae", IMAGE_META, horizon=2, n_action_steps=2, **TINY_IMAGE)
    assert latent_labels(bvae, 4) == ["a[0] t+0", "a[1] t+0", "a[0] t+1", "a[1] t+1"]
    assert latent_labels(policy_from_yaml("bvae", IMAGE_META, **TINY_IMAGE), 2) == ["a[0]", "a[1]"]
    assert latent_labels(policy_from_yaml("vae_nn", IMAGE_META, **TINY_IMAGE), 2) == ["z[0]", "z[1]"]


def test_latent_traversal_cli_writes_the_grid_from_a_checkpoint(image_store, tmp_path):
    cfg = make_cfg(["policy=bvae", "policy.conv_channels=[4,4,8,8]", "policy.hidden_dim=8", f"task.dataset_path={image_store}",
                    "training.steps=2", "training.batch_size=8"])
    Workspace(cfg, tmp_path).run()
    assert (tmp_path / "visualizations" / "step_2" / "latent_traversal.png").is_file()  # logged at each evaluation
    out = tmp_path / "grid.png"
    run = subprocess.run([sys.executable, "eval/latent_traversal.py", f"checkpoint={tmp_path / 'checkpoints' / 'latest.pt'}",
                          f"out={out}", "index=3"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    grid = imageio.imread(out)  # 24x24 images, 3-dim action: 3 rows, 6 columns, and the labels
    assert grid.shape[0] > 3 * 26 + 2 and grid.shape[1] > 6 * 26 + 2


# ---- a real task --------------------------------------------------------------------------------
@pytest.mark.slow
def test_bvae_learns_metaworld_push_from_state(tmp_path):
    # Measured (20 demos, 600 steps, lr 3e-3, 20 rollouts): 20/20 successes with seed 0 (this config), 16/20 with
    # seed 1; BC at the framework's default budget: 50/50.
    # Meta-World reach is not used: there BC and BVAE both reach only ~10-25 % here.
    from il_policies.envs import make_task_by_name
    from il_policies.envs.demos import generate_demos
    from il_policies.rollout import PolicyActor, eval_seeds, run_rollouts

    task = make_task_by_name("metaworld_push")
    store = tmp_path / "push.zarr"
    generate_demos(task, store, 20)
    cfg = make_cfg(["policy=bvae", "task=metaworld_push", f"task.dataset_path={store}", "training.steps=600",
                    "training.batch_size=64", "training.val_every=600", "eval.n_episodes=0", "training.lr=3e-3"])
    Workspace(cfg, tmp_path / "run").run()
    policy = load_policy(tmp_path / "run" / "checkpoints" / "latest.pt")
    result, _ = run_rollouts(task, PolicyActor(policy), eval_seeds(10), progress=False)
    assert result.success_rate >= 0.6, result.summary()


@pytest.mark.parametrize("yaml", ["bvae", "bvae_original"])
def test_batchnorm_running_statistics_come_only_from_inference_like_inputs(yaml):
    """With norm=batch a training step runs E on real and on decoded observations and D on sampled
    latents and on actions; only E on real observations and D on actions (what each sees at
    inference, `select_action` and `decode_action`) may move the running statistics."""
    import copy

    from einops import rearrange

    policy = policy_from_yaml(yaml, IMAGE_META, **TINY_IMAGE, norm="batch", upsample_sizes=None).train()
    reference = copy.deepcopy(policy)
    batch = random_batch(IMAGE_META, batch=8)
    policy.compute_loss(batch)
    with torch.no_grad():
        reference.vae.encode(reference.vae.pack(reference.normalize_obs(batch["obs"])))
        reference.vae.decode(rearrange(reference.normalizer.normalize("action", batch["action"]), "b h a -> b (h a)"))
    stats = {name: buffer for name, buffer in policy.named_buffers() if "running" in name or "num_batches" in name}
    expected = dict(reference.named_buffers())
    assert any("encoder" in name for name in stats) and any("decoder" in name for name in stats)
    for name, value in stats.items():
        torch.testing.assert_close(value, expected[name], msg=name)
    moved = [name for name, value in stats.items() if name.endswith("running_mean") and value.abs().sum() > 0]
    assert moved  # the step did update statistics, so the comparison above could fail
