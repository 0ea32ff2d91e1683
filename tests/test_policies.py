"""Properties every registered policy must have, checked over the whole registry."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from il_policies import available_policies, load_policy, make_policy
from il_policies.checkpoint import CheckpointError
from il_policies.data.dataset import SequenceDataset, collate_batch, prepare_batch
from il_policies.training import Workspace
from il_policies.policies.registry import POLICY_MODULES, make_config
from tests.conftest import REPO, make_cfg

POLICIES = available_policies()
# Every registered policy at its own config, plus configs that build a policy differently.
CONFIGS = [*POLICIES, "bc_conv_vae"]
# Small shapes so the whole registry trains in seconds; each policy may need its own small options.
SMALL = {
    "bc": ["policy.hidden_dims=[32,32]", "policy.vision.conv_channels=[8,16]", "policy.vision.feature_dim=16"],
    "act": ["policy.backbone=conv", "policy.conv_channels=[8,16]", "policy.d_model=32", "policy.n_heads=4",
            "policy.dim_feedforward=64", "policy.n_encoder_layers=1", "policy.n_vae_encoder_layers=1",
            "policy.latent_dim=8", "policy.horizon=10", "policy.n_action_steps=10"],
    "bvae": ["policy.conv_channels=[4,4,8,8]", "policy.hidden_dim=16", "policy.mlp_hidden_dims=[32,32]"],
    "vae_nn": ["policy.conv_channels=[4,4,8,8]", "policy.hidden_dim=16", "policy.mlp_hidden_dims=[32,32]"],
    "diffusion": ["policy.n_obs_steps=1", "policy.down_dims=[16,32]", "policy.step_embed_dim=16", "policy.n_groups=4",
                  "policy.vision.backbone=conv", "policy.vision.conv_channels=[8,16]", "policy.vision.num_keypoints=4",
                  "policy.vision.feature_dim=16", "policy.horizon=4", "policy.n_action_steps=2",
                  "policy.num_inference_steps=3"],
    "latent_bc": ["policy.n_obs_steps=3", "policy.frame_size=16", "policy.conv_channels=[4,8]", "policy.feature_dim=16",
                  "policy.hidden_dim=16", "policy.latent_dim=4", "policy.head_hidden_dims=[16]"],
    "bc_conv_vae": ["policy.conv_channels=[4,4,8,8]", "policy.hidden_dim=16", "policy.hidden_dims=[32,32]"],
}


def small_overrides(name: str) -> list[str]:
    return [f"policy={name}", *SMALL.get(name, [])]


def policy_dataset(store, cfg) -> SequenceDataset:
    """The store in the windows the Workspace samples for `cfg.policy` (`action_window()`)."""
    window = make_config(cfg.policy).action_window()
    return SequenceDataset.from_store(store, n_obs_steps=window.n_obs_steps, horizon=window.horizon, action_offset=window.start)


def test_registry_lists_bc():
    assert "bc" in POLICIES


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("store_fixture", ["linear_store", "image_store"])
def test_train_save_load_identical_actions(name, store_fixture, request, tmp_path):
    store = request.getfixturevalue(store_fixture)
    cfg = make_cfg([*small_overrides(name), f"task.dataset_path={store}", "training.steps=3", "training.batch_size=8"])
    workspace = Workspace(cfg, tmp_path)
    summary = workspace.run()
    assert summary["step"] == 3
    checkpoint = tmp_path / "checkpoints" / "latest.pt"
    assert checkpoint.is_file() and (tmp_path / "checkpoints" / "best.pt").is_file()

    loaded = load_policy(checkpoint)
    assert loaded.name == cfg.policy.name and not loaded.training
    trained = workspace.policy  # left in train mode: the robot-facing calls put it in eval mode themselves
    dataset = workspace.dataset
    batch = prepare_batch(collate_batch(dataset.__getitems__([0, 5, 9])), dataset.shape_meta, "cpu")

    def seeded():  # sampling policies draw from it; the same generator state gives the same actions
        return torch.Generator().manual_seed(7)

    with workspace._inference_weights():  # what checkpoints hold: the EMA weights where the policy keeps them
        torch.testing.assert_close(loaded.predict_action_chunk(batch["obs"], seeded()),
                                   trained.predict_action_chunk(batch["obs"], seeded()), rtol=0, atol=0)
        assert not trained.training

        # select_action through the queue gives the same first action, from raw (uint8 HWC) observations.
        raw = dataset[0]["obs"]
        step_obs = {key: torch.as_tensor(value[-1])[None] for key, value in raw.items()}
        loaded.reset()
        trained.reset()
        torch.testing.assert_close(loaded.select_action(step_obs, seeded()), trained.select_action(step_obs, seeded()), rtol=0, atol=0)
    assert loaded.select_action(step_obs).shape == (1, dataset.shape_meta["action"]["shape"][0])


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_load_policy_with_compile_gives_the_eager_actions(name, image_store, tmp_path):
    cfg = make_cfg([*small_overrides(name), f"task.dataset_path={image_store}", "training.steps=2", "training.batch_size=8"])
    workspace = Workspace(cfg, tmp_path)
    workspace.run()
    eager = load_policy(tmp_path / "checkpoints" / "latest.pt")
    compiled = load_policy(tmp_path / "checkpoints" / "latest.pt", compile=True)
    dataset = workspace.dataset
    step_obs = {key: torch.as_tensor(value[-1])[None] for key, value in dataset[3]["obs"].items()}
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731  (sampling policies: the same noise)
    torch.testing.assert_close(compiled.predict_action_chunk(step_obs, seeded()), eager.predict_action_chunk(step_obs, seeded()),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_loss_is_finite_and_backpropagates(name, image_store):
    cfg = make_cfg([*small_overrides(name), "policy.n_obs_steps=2", "policy.horizon=4", "policy.n_action_steps=2"])
    dataset = policy_dataset(image_store, cfg)
    policy = make_policy(cfg.policy, dataset.shape_meta)
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    batch = prepare_batch(collate_batch(dataset.__getitems__(list(range(6)))), dataset.shape_meta, "cpu")
    loss, metrics = policy.compute_loss(batch)
    assert torch.isfinite(loss) and metrics
    loss.backward()
    # Every parameter learns from the second step on. (At DETR's initialization, zero attention biases,
    # ACT's first decoder self-attention over its zero target outputs exactly 0, so its weights and the
    # LayerNorm after it get their first gradient once the first step has moved the biases.)
    torch.optim.SGD(policy.parameters(), lr=0.01).step()
    policy.zero_grad()
    policy.compute_loss(batch)[0].backward()
    without_grad = [n for n, p in policy.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert without_grad == []
    policy.eval()
    chunk = policy.predict_action_chunk(batch["obs"])
    assert chunk.shape == (6, policy.window.horizon - policy.window.current, 3)  # from the current step on


@pytest.mark.parametrize("name", CONFIGS)
def test_action_queue_runs_network_every_n_action_steps(name, linear_store):
    dataset = SequenceDataset.from_store(linear_store, n_obs_steps=1, horizon=4)
    cfg = make_cfg([*small_overrides(name), "policy.horizon=4", "policy.n_action_steps=3"])
    policy = make_policy(cfg.policy, dataset.shape_meta).eval()
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    calls = []
    original = policy._predict_action_chunk
    policy._predict_action_chunk = lambda obs, generator=None: calls.append(1) or original(obs, generator)
    obs = {"state": torch.zeros(2, 5)}
    actions = [policy.select_action(obs, torch.Generator().manual_seed(i)) for i in range(7)]
    assert len(calls) == 3  # steps 0, 3, 6
    history = {"state": torch.zeros(2, policy.window.n_obs_steps, 5)}  # step 0's history: its frame repeated
    chunk = original(history, torch.Generator().manual_seed(0))[:, policy.window.current:]  # sampling policies: step 0's noise
    torch.testing.assert_close(torch.stack(actions[:3], dim=1), chunk[:, :3])
    policy.reset()
    policy.select_action(obs)
    assert len(calls) == 4


@pytest.mark.parametrize("name", CONFIGS)
def test_actions_are_clipped_to_asymmetric_bounds(name, linear_store):
    """Bounds like ALOHA's gripper or a dataset's observed range are not symmetric about zero: every
    returned action lies in [low, high], and an action outside is moved to the nearer bound."""
    dataset = SequenceDataset.from_store(linear_store, n_obs_steps=1, horizon=4)
    policy = make_policy(make_cfg([*small_overrides(name), "policy.horizon=4", "policy.n_action_steps=1"]).policy,
                         dataset.shape_meta).eval()
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    action_dim = dataset.shape_meta["action"]["shape"][0]
    low = torch.linspace(0.2, 0.5, action_dim)  # an interval that excludes zero and is not [-high, high]
    high = low + 0.1
    raw = policy._predict_action_chunk({"state": torch.zeros(3, 1, 5)}, torch.Generator().manual_seed(0))[:, 0]
    policy.set_action_bounds(low, high)
    actions = policy.select_action({"state": torch.zeros(3, 5)}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(actions, torch.minimum(torch.maximum(raw, low), high))
    far = torch.stack([low - 10, high + 10, (low + high) / 2])
    torch.testing.assert_close(policy._clip(far), torch.stack([low, high, (low + high) / 2]))


@pytest.mark.parametrize("name", CONFIGS)
def test_temporal_ensembling_averages_every_chunks_prediction(name, linear_store):
    from il_policies.nn.temporal_ensemble import offline_temporal_ensemble

    dataset = SequenceDataset.from_store(linear_store, n_obs_steps=1, horizon=4)
    cfg = make_cfg([*small_overrides(name), "policy.horizon=4", "policy.n_action_steps=1", "policy.temporal_ensemble_coeff=0.01"])
    policy = make_policy(cfg.policy, dataset.shape_meta).eval()
    policy.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    chunks = []
    original = policy._predict_action_chunk
    policy._predict_action_chunk = lambda obs, generator=None: chunks.append(original(obs, generator)) or chunks[-1]
    torch.manual_seed(0)
    observations = [{"state": torch.randn(2, 5)} for _ in range(9)]
    actions = torch.stack([policy.select_action(o, torch.Generator().manual_seed(i)) for i, o in enumerate(observations)], dim=1)
    assert len(chunks) == 9  # the network runs every step
    expected = policy._clip(offline_temporal_ensemble([chunk[:, policy.window.current:] for chunk in chunks], 0.01))
    torch.testing.assert_close(actions, expected)
    policy.reset()
    assert policy._ensembler.weighted_sum is None
    with pytest.raises(ValueError, match="n_action_steps=1"):
        make_policy(make_cfg([*small_overrides(name), "policy.horizon=4", "policy.n_action_steps=2",
                              "policy.temporal_ensemble_coeff=0.01"]).policy, dataset.shape_meta)


def test_unknown_policy_and_option_are_refused():
    meta = {"obs": {"state": {"shape": (5,), "kind": "low_dim"}}, "action": {"shape": (3,)}}
    with pytest.raises(ValueError, match="unknown policy 'nope'.*bc"):
        make_policy({"name": "nope"}, meta)
    with pytest.raises(ValueError, match="no option.*'colour'"):
        make_policy({"name": "bc", "colour": 3}, meta)


def test_load_policy_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(CheckpointError, match="not an il_policies checkpoint"):
        load_policy(bogus)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_policy(tmp_path / "garbage.pt")


@pytest.mark.parametrize("name", CONFIGS)
def test_the_accelerated_policy_computes_the_reference_function(name, image_store):
    """`il_policies.accel.accelerate` (training.accel=true, load_policy(accel=True)): the same loss and
    gradients with dropout off (its masks are drawn differently), the same actions in eval mode."""
    from il_policies.accel import accelerate

    cfg = make_cfg([*small_overrides(name), "policy.n_obs_steps=2", "policy.horizon=4", "policy.n_action_steps=2"])
    dataset = policy_dataset(image_store, cfg)
    reference = make_policy(cfg.policy, dataset.shape_meta)
    reference.normalizer.fit(dataset.fit_data(), action_key=dataset.action_key)
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    fast = accelerate(copy.deepcopy(reference))
    batch = prepare_batch(collate_batch(dataset.__getitems__(list(range(6)))), dataset.shape_meta, "cpu")
    losses = []
    for policy in (fast, reference):
        torch.manual_seed(0)  # the same sampling noise (reparameterization)
        losses.append(policy.compute_loss(batch)[0])
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
    fast.eval(), reference.eval()
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731  (sampling policies: the same noise)
    torch.testing.assert_close(fast.predict_action_chunk(batch["obs"], seeded()), reference.predict_action_chunk(batch["obs"], seeded()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_load_policy_imports_only_the_checkpoints_policy(name, linear_store, tmp_path):
    """On a robot, `load_policy` imports the checkpoint's policy module and what its network needs:
    no other policy, no Hydra / wandb / diffusers / zarr, no training code, no simulator."""
    cfg = make_cfg([*small_overrides(name), f"task.dataset_path={linear_store}", "training.steps=1", "training.batch_size=4"])
    Workspace(cfg, tmp_path).run()
    code = (
        "import sys, numpy as np; from il_policies import load_policy\n"
        f"policy = load_policy({str(tmp_path / 'checkpoints' / 'latest.pt')!r}); policy.select_action({{'state': np.zeros(5)}})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'wandb', 'diffusers', 'zarr') "
        "or m.startswith(('il_policies.training', 'il_policies.envs', 'il_policies.policies.'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    module = POLICY_MODULES[cfg.policy.name]
    shared = ["il_policies.policies.base", "il_policies.policies.config", "il_policies.policies.observations",
              "il_policies.policies.registry"]
    if cfg.policy.name in ("bvae", "vae_nn"):
        shared.append("il_policies.policies.generative")  # their shared config
    if cfg.policy.name == "diffusion":  # its samplers are diffusers' schedulers
        shared += [m for m in eval(run.stdout.strip()) if m.split(".")[0] == "diffusers"]
    assert sorted(set(eval(run.stdout.strip())) - {module}) == sorted(shared)


def test_the_base_class_executes_the_actions_of_the_declared_window():
    """A policy whose chunk starts n_obs_steps - 1 steps in the past (Diffusion Policy's window): the
    queue runs chunk[current : current + n_action_steps], predict_action_chunk returns chunk[current:]."""
    from dataclasses import dataclass

    from il_policies.policies.bc import BCConfig, BCPolicy
    from il_policies.policies.config import ActionWindow

    @dataclass
    class PastWindowConfig(BCConfig):
        def action_window(self):
            return ActionWindow(self.n_obs_steps, self.horizon, -(self.n_obs_steps - 1), self.n_action_steps)

    config = PastWindowConfig(n_obs_steps=3, horizon=8, n_action_steps=4, hidden_dims=(8,))
    policy = BCPolicy(config, {"obs": {"state": {"shape": (5,), "kind": "low_dim"}}, "action": {"shape": (2,)}})
    assert policy.window.current == 2 and policy.metadata["action_start"] == -2
    chunk = torch.arange(8 * 2, dtype=torch.float32).view(1, 8, 2)
    policy._predict_action_chunk = lambda obs, generator=None: chunk
    actions = torch.stack([policy.select_action({"state": torch.zeros(1, 5)}) for _ in range(4)], dim=1)
    torch.testing.assert_close(actions, chunk[:, 2:6])
    torch.testing.assert_close(policy.predict_action_chunk({"state": torch.zeros(1, 5)}), chunk[:, 2:])
    with pytest.raises(ValueError, match="cannot exceed the actions predicted from the current step on"):
        PastWindowConfig(n_obs_steps=3, horizon=8, n_action_steps=7)
