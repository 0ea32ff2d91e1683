"""ACT: shapes, masking, the KL term, temporal ensembling, decoder depth, the backbone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from il_policies import make_policy
from il_policies.nn.temporal_ensemble import TemporalEnsembler, offline_temporal_ensemble
from il_policies.nn.transformer import sinusoidal_1d, sinusoidal_2d
from il_policies.nn.vae import gaussian_kl, reparameterize
from il_policies.nn.vision import ResNetBackbone
from tests.conftest import make_cfg

SMALL = dict(d_model=32, n_heads=4, dim_feedforward=64, n_encoder_layers=2, n_vae_encoder_layers=2, latent_dim=8,
             backbone="conv", conv_channels=(8, 16), horizon=6, n_action_steps=6)
IMAGE_META = {"obs": {"agent_pos": {"shape": (4,), "kind": "low_dim"}, "env_state": {"shape": (3,), "kind": "low_dim"},
                      "top": {"shape": (3, 24, 24), "kind": "rgb"}, "wrist": {"shape": (3, 24, 24), "kind": "rgb"}},
              "action": {"shape": (5,)}}
STATE_META = {"obs": {"state": {"shape": (7,), "kind": "low_dim"}}, "action": {"shape": (2,)}}


def make(meta, **options):
    return make_policy({"name": "act", **{**SMALL, **options}}, meta)


def random_batch(meta, batch=3, horizon=6, n_obs_steps=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = {k: (torch.rand if m["kind"] == "rgb" else torch.randn)((batch, n_obs_steps, *m["shape"]), generator=g)
           for k, m in meta["obs"].items()}
    is_pad = torch.zeros(batch, horizon, dtype=torch.bool)
    is_pad[0, horizon - 2 :] = True
    is_pad[2, 1:] = True
    return {"obs": obs, "action": torch.randn(batch, horizon, meta["action"]["shape"][0], generator=g), "action_is_pad": is_pad}


@pytest.mark.parametrize("meta", [IMAGE_META, STATE_META], ids=["images", "state_only"])
@pytest.mark.parametrize("n_obs_steps", [1, 2])
def test_shapes(meta, n_obs_steps):
    policy = make(meta, n_obs_steps=n_obs_steps)
    batch = random_batch(meta, n_obs_steps=n_obs_steps)
    loss, metrics = policy.compute_loss(batch)
    assert torch.isfinite(loss) and set(metrics) == {"l1", "kl", "kl_weight"}
    loss.backward()
    policy.eval()
    assert policy.predict_action_chunk(batch["obs"]).shape == (3, 6, meta["action"]["shape"][0])
    step = {k: v[:, -1] for k, v in batch["obs"].items()}
    assert policy.select_action(step).shape == (3, meta["action"]["shape"][0])
    # Tokens: z, proprio, environment state, and one per feature-map cell per camera and step.
    if meta is IMAGE_META:
        assert policy.proprio_key == "agent_pos" and policy.env_keys == ["env_state"]
        assert policy.image_pos.shape == (2 * n_obs_steps * 6 * 6, 32)
    else:
        assert policy.proprio_proj is None and policy.env_keys == ["state"]


def test_resnet18_defaults_match_the_original_sizes():
    meta = {"obs": {"agent_pos": {"shape": (14,), "kind": "low_dim"}, "image": {"shape": (3, 96, 96), "kind": "rgb"}},
            "action": {"shape": (14,)}}
    policy = make_policy({"name": "act"}, meta)
    c = policy.config
    assert (c.horizon, c.d_model, c.n_heads, c.dim_feedforward, c.n_encoder_layers, c.n_vae_encoder_layers,
            c.n_decoder_layers, c.dropout, c.kl_schedule.kind, c.kl_schedule.weight, c.lr_backbone, c.latent_dim) == (
        100, 512, 8, 3200, 4, 4, 1, 0.1, "constant", 10.0, 1e-5, 32)
    # The original's training: AdamW at a constant 1e-5, weight decay 1e-4, no gradient clipping.
    p = c.training_preset
    assert (p.lr, p.weight_decay, p.lr_scheduler, p.lr_warmup_steps, p.grad_clip, p.ema.enabled) == (1e-5, 1e-4, "constant", 0, 0.0, False)
    # LeRobot's ACT on these shapes: 51,613,582, with FrozenBatchNorm (buffers); trained from scratch,
    # the backbone's GroupNorm layers add their 9,600 affine parameters.
    assert sum(p.numel() for p in policy.parameters()) == 51_613_582 + 9_600


def test_act_from_scratch_normalizes_its_backbone_and_trains_every_norm_layer():
    meta = {"obs": {"image": {"shape": (3, 64, 64), "kind": "rgb"}}, "action": {"shape": (2,)}}
    policy = make_policy({"name": "act", "d_model": 32, "n_heads": 4, "dim_feedforward": 64, "horizon": 4, "n_action_steps": 4}, meta)
    assert policy.config.backbone_norm == "group"
    norms = [m for m in policy.backbone.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert len(norms) == 20 and all(isinstance(m, torch.nn.GroupNorm) for m in norms)
    torch.manual_seed(0)
    batch = {"obs": {"image": torch.rand(3, 1, 3, 64, 64)}, "action": torch.randn(3, 4, 2), "action_is_pad": torch.zeros(3, 4, dtype=torch.bool)}
    policy.train()
    policy.compute_loss(batch)[0].backward()
    for m in norms:
        assert m.weight.requires_grad and m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    # A GroupNorm changes its input (a frozen, randomly initialized BatchNorm is the identity).
    x = torch.randn(2, norms[0].num_channels, 5, 5) * 3 + 1
    assert not torch.allclose(norms[0](x), x, atol=1e-2)
    with pytest.raises(ValueError, match="identity"):
        make_policy({"name": "act", "backbone_norm": "frozen"}, meta)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in policy.backbone.modules())  # frozen BatchNorm
    groups = policy.optim_groups()
    assert groups[1]["lr"] == 1e-5 and len(groups[1]["params"]) == len(list(policy.backbone.parameters()))


def test_padded_steps_give_zero_loss_and_zero_gradient():
    policy = make(IMAGE_META)
    batch = random_batch(IMAGE_META)

    def loss_and_grads(b):
        policy.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks and latent noise
        loss, _ = policy.compute_loss(b)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(batch)
    changed = copy.deepcopy(batch)
    changed["action"][batch["action_is_pad"]] = 1000.0 * torch.randn(int(batch["action_is_pad"].sum()), 5)
    loss2, grads2 = loss_and_grads(changed)
    assert torch.equal(loss, loss2)
    assert grads.keys() == grads2.keys() and all(torch.equal(grads[n], grads2[n]) for n in grads)
    changed["action"][1, 0] += 1.0  # a real step does matter
    assert not torch.equal(loss_and_grads(changed)[0], loss)


def test_loss_is_masked_l1_plus_weighted_kl_by_hand():
    policy = make(STATE_META, dropout=0.0, kl_schedule={"kind": "constant", "weight": 3.0})
    batch = random_batch(STATE_META)
    torch.manual_seed(1)
    loss, metrics = policy.compute_loss(batch)

    nobs = policy.normalizer.normalize_obs(batch["obs"])  # an unfitted normalizer is the identity
    torch.manual_seed(1)
    mu, logvar = policy._posterior(nobs, batch["action"], batch["action_is_pad"])
    latent = reparameterize(mu, torch.exp(0.5 * logvar))
    predicted = policy._decode(nobs, latent)
    keep = (~batch["action_is_pad"]).float()[..., None]
    l1 = ((predicted - batch["action"]).abs() * keep).sum() / predicted.numel()  # the original's mean over all entries
    kl = (0.5 * (mu.square() + logvar.exp() - logvar - 1.0)).sum(-1).mean()
    torch.testing.assert_close(kl, gaussian_kl(mu, logvar).mean())
    torch.testing.assert_close(metrics["l1"], l1.item())
    torch.testing.assert_close(metrics["kl"], kl.item())
    torch.testing.assert_close(loss, l1 + 3.0 * kl)
    assert metrics["kl_weight"] == 3.0


def test_kl_weight_follows_the_schedule():
    policy = make(STATE_META, kl_schedule={"kind": "linear", "weight": 10.0, "warmup_steps": 100})
    policy.set_training_step(25)
    assert policy.compute_loss(random_batch(STATE_META))[1]["kl_weight"] == pytest.approx(2.5)


@pytest.mark.parametrize("coeff", [0.01, 0.0, 0.5, -0.1])
def test_online_temporal_ensemble_equals_offline_weighted_average(coeff):
    torch.manual_seed(0)
    chunk_size, steps = 5, 13  # the window slides past the chunk size
    chunks = [torch.randn(2, chunk_size, 3) for _ in range(steps)]
    ensembler = TemporalEnsembler(coeff, chunk_size)
    online = torch.stack([ensembler.update(c) for c in chunks], dim=1)
    torch.testing.assert_close(online, offline_temporal_ensemble(chunks, coeff))
    # Step 2 by hand: predictions from steps 0, 1, 2 for step 2, oldest weighted exp(0).
    w = torch.exp(-coeff * torch.arange(3.0))
    by_hand = (w[0] * chunks[0][:, 2] + w[1] * chunks[1][:, 1] + w[2] * chunks[2][:, 0]) / w.sum()
    torch.testing.assert_close(online[:, 2], by_hand)


def test_decoder_depth_option_uses_every_layer():
    batch = random_batch(IMAGE_META)
    for depth in (1, 3):
        policy = make(IMAGE_META, n_decoder_layers=depth).eval()
        assert len(policy.decoder.layers) == depth
        before = policy.predict_action_chunk(batch["obs"])
        with torch.no_grad():
            policy.decoder.layers[-1].linear2.weight.add_(0.5)
        assert not torch.allclose(policy.predict_action_chunk(batch["obs"]), before)
        if depth > 1:
            with torch.no_grad():
                policy.decoder.layers[0].cross_attn.in_proj_weight.add_(0.5)
            assert not torch.allclose(policy.predict_action_chunk(batch["obs"]), before)


def test_backbone_weights_file_and_batchnorm_option(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    loaded = ResNetBackbone("resnet18", norm="frozen", weights_path=str(path))
    torch.testing.assert_close(loaded.body[4][0].conv1.weight, reference.layer1[0].conv1.weight)
    torch.testing.assert_close(loaded.body[1].running_var, reference.bn1.running_var)
    assert isinstance(ResNetBackbone(norm="batch").body[1], torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="identity"):
        ResNetBackbone(norm="frozen")
    with pytest.raises(FileNotFoundError, match="no download"):
        ResNetBackbone(weights_path=str(tmp_path / "missing.pt"))


def test_position_tables():
    table = sinusoidal_1d(4, 6)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(table[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 6))))
    grid = sinusoidal_2d(2, 3, 8)  # rows in the first half, columns in the second
    assert grid.shape == (6, 8)
    torch.testing.assert_close(grid[0, :4], grid[2, :4])
    torch.testing.assert_close(grid[0, 4:], grid[3, 4:])


@pytest.mark.slow
def test_act_learns_metaworld_reach(tmp_path):
    """20 scripted demos, 600 steps of a small ACT (d_model 128, the default dropout 0.1), 20 rollouts.
    Measured success (bench/ACT.md): 0.65 for each of seeds 0, 1, 2; the bound leaves ~2 binomial
    standard deviations below."""
    from il_policies.envs import make_task_by_name
    from il_policies.envs.demos import generate_demos
    from il_policies.training import Workspace

    path = tmp_path / "reach.zarr"
    generate_demos(make_task_by_name("metaworld_reach"), path, 20)
    cfg = make_cfg([
        "policy=act", "task=metaworld_reach", f"task.dataset_path={path}", "policy.d_model=128", "policy.n_heads=4",
        "policy.dim_feedforward=512", "policy.n_encoder_layers=2", "policy.n_vae_encoder_layers=2", "policy.horizon=20",
        "policy.n_action_steps=10", "training.steps=600", "training.batch_size=32", "training.val_every=600",
        # A short run: a higher lr than the original's constant 1e-5, warm-up, cosine decay and clipping.
        "training.lr=3e-4", "training.lr_scheduler=cosine", "training.lr_warmup_steps=50", "training.grad_clip=10",
        "eval.n_episodes=20", "eval.n_videos=0", "training.num_threads=2",
    ])
    summary = Workspace(cfg, tmp_path / "run").run()
    print(f"metaworld_reach ACT success rate {summary['eval/success_rate']:.2f}")
    assert summary["eval/success_rate"] >= 0.4, summary


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_layers_equal_torchs_without_positions(pre_norm):
    """With no position embeddings DETR's layers are torch's nn.Transformer layers (norm_first = pre-norm)."""
    from il_policies.nn.transformer import DecoderLayer, EncoderLayer

    torch.manual_seed(0)
    ours = EncoderLayer(16, 4, 32, dropout=0.0, pre_norm=pre_norm)
    ref = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=pre_norm)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(7, 2, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    torch.testing.assert_close(ours(x, key_padding_mask=mask), ref(x, src_key_padding_mask=mask))

    ours = DecoderLayer(16, 4, 32, dropout=0.0, pre_norm=pre_norm)
    ref = torch.nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, norm_first=pre_norm)
    ref.load_state_dict({k.replace("cross_attn", "multihead_attn"): v for k, v in ours.state_dict().items()})
    target, memory = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    torch.testing.assert_close(ours(target, memory, memory_key_padding_mask=mask), ref(target, memory, memory_key_padding_mask=mask))
    # Positions go to the queries and keys only (DETR): a position added to the values as well changes the output.
    pos = torch.randn(5, 1, 16)
    assert not torch.allclose(ours(target, memory, query_pos=pos), ours(target + pos, memory))
