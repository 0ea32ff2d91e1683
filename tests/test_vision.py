"""Image augmentation and the shared image encoders (il_policies.nn.augment, il_policies.nn.vision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from il_policies import make_policy
from il_policies.nn.augment import ObservationAugment
from il_policies.nn.obs_encoder import ObservationEncoder
from il_policies.nn.vision import ImageEncoder, ResNetBackbone, SpatialSoftmax
from il_policies.policies.config import AugmentConfig, VisionConfig

META = {"image": {"shape": (3, 20, 30), "kind": "rgb"}, "pos": {"shape": (2,), "kind": "low_dim"}}


def coordinate_images(batch: int, steps: int, height: int = 20, width: int = 30) -> torch.Tensor:
    """(B, T, 3, H, W): channel 0 holds the row, channel 1 the column, channel 2 the sample index."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([ys, xs, torch.zeros_like(ys)]).float()
    images = image.expand(batch, steps, 3, height, width).clone()
    images[:, :, 2] = torch.arange(batch, dtype=torch.float32)[:, None, None, None]
    return images


def test_random_crop_takes_an_in_bounds_window_per_sample_shared_over_steps():
    augment = ObservationAugment(AugmentConfig("crop", crop_ratio=0.9), META).train()
    assert augment.network_obs_meta["image"]["shape"] == (3, 18, 27)
    torch.manual_seed(0)
    images = coordinate_images(64, 2)
    out = augment({"image": images, "pos": torch.zeros(64, 2, 2)})
    assert out["image"].shape == (64, 2, 3, 18, 27) and out["pos"].shape == (64, 2, 2)
    tops, lefts = out["image"][:, :, 0, 0, 0], out["image"][:, :, 1, 0, 0]
    assert torch.equal(tops[:, 0], tops[:, 1]) and torch.equal(lefts[:, 0], lefts[:, 1])  # one crop per sample
    assert tops.min() >= 0 and tops.max() <= 2 and lefts.min() >= 0 and lefts.max() <= 3
    assert len(set(zip(tops[:, 0].tolist(), lefts[:, 0].tolist()))) > 5  # samples get different crops
    for b in range(64):  # every output is the contiguous window at its offset, of its own sample
        top, left = int(tops[b, 0]), int(lefts[b, 0])
        torch.testing.assert_close(out["image"][b], images[b, :, :, top : top + 18, left : left + 27], rtol=0, atol=0)


def test_evaluation_is_the_center_crop_and_deterministic():
    augment = ObservationAugment(AugmentConfig("crop", crop_ratio=0.9), META).eval()
    images = coordinate_images(3, 1)
    first, second = augment({"image": images})["image"], augment({"image": images})["image"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, images[..., 1:19, 1:28], rtol=0, atol=0)


def test_random_shift_pads_with_edges_and_keeps_the_size():
    augment = ObservationAugment(AugmentConfig("shift", shift_pixels=4), META).train()
    torch.manual_seed(1)
    images = coordinate_images(32, 1)
    out = augment({"image": images})["image"]
    assert out.shape == images.shape
    # Edge replication clamps coordinates: each row index is clamp(row + offset, 0, H - 1) for one offset in [-4, 4].
    offsets = out[:, 0, 0, :, 0] - torch.arange(20).float()
    for b in range(32):
        shift = next(s for s in range(-4, 5) if torch.equal(out[b, 0, 0, :, 0], (torch.arange(20) + s).clamp(0, 19).float()))
        assert -4 <= shift <= 4 and offsets[b].abs().max() <= 4
    torch.testing.assert_close(augment.eval()({"image": images})["image"], images, rtol=0, atol=0)


def test_color_jitter_stays_in_range_and_only_in_training():
    augment = ObservationAugment(AugmentConfig("none", color_jitter=0.3), META)
    torch.manual_seed(0)
    images = torch.rand(8, 2, 3, 20, 30)
    jittered = augment.train()({"image": images})["image"]
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, images)
    torch.testing.assert_close(augment.eval()({"image": images})["image"], images, rtol=0, atol=0)


def test_augmentation_draws_from_torchs_generator():
    augment = ObservationAugment(AugmentConfig("crop", color_jitter=0.2), META).train()
    images = torch.rand(4, 1, 3, 20, 30)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(augment({"image": images})["image"])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_bad_augment_options_are_refused():
    with pytest.raises(ValueError, match="augment.kind"):
        AugmentConfig("flip")
    with pytest.raises(ValueError, match="crop_ratio"):
        AugmentConfig("crop", crop_ratio=1.5)
    with pytest.raises(ValueError, match="per-pixel"):
        make_policy({"name": "bc", "image_norm_per_pixel": True, "augment": {"kind": "crop"}}, {"obs": META, "action": {"shape": (2,)}})


def test_a_cropping_policy_takes_full_size_robot_images_and_exports_the_center_crop(tmp_path):
    from il_policies.accel.backends import OnnxRuntimeNetwork, export_onnx

    policy = make_policy({"name": "bc", "vision": {"conv_channels": [8, 16], "feature_dim": 8}, "augment": {"kind": "crop"}},
                         {"obs": META, "action": {"shape": (2,)}})
    assert policy.network_obs_meta["image"]["shape"] == (3, 18, 27)
    obs = {"image": np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8), "pos": np.zeros(2)}
    policy.reset()
    reference = policy.select_action(obs)
    policy.use_backend(OnnxRuntimeNetwork(export_onnx(policy, tmp_path / "bc.onnx"), 1))
    policy.reset()
    np.testing.assert_allclose(policy.select_action(obs), reference, atol=1e-5)


def test_spatial_softmax_keypoint_lands_on_a_bright_blob():
    pool = SpatialSoftmax(in_channels=1, height=16, width=16, num_keypoints=1)
    with torch.no_grad():
        pool.keypoint_maps.weight.fill_(1.0)
        pool.keypoint_maps.bias.zero_()
    features = torch.zeros(1, 1, 16, 16)
    features[0, 0, 3, 10] = 20.0
    x, y = pool(features)[0].tolist()
    grid = torch.linspace(-1, 1, 16)
    assert math.isclose(x, grid[10].item(), abs_tol=1e-3) and math.isclose(y, grid[3].item(), abs_tol=1e-3)
    pool.log_temperature.data.fill_(math.log(100.0))  # a high temperature spreads the attention: the mean of the grid
    x, y = pool(features)[0].tolist()
    assert abs(x) < 0.2 and abs(y) < 0.2


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_group_norm_resnet_trains_every_parameter(name):
    backbone = ResNetBackbone(name, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    torch.manual_seed(0)
    backbone(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


@pytest.mark.parametrize("backbone", ["conv", "resnet18"])
@pytest.mark.parametrize("pool", ["avgpool", "spatial_softmax", "grid", "flatten"])
def test_image_encoder_options(backbone, pool):
    config = VisionConfig(backbone=backbone, pool=pool, feature_dim=12, conv_channels=(8, 16), num_keypoints=4)
    encoder = ImageEncoder((3, 32, 32), config)
    out = encoder(torch.rand(5, 3, 32, 32))
    assert out.shape == (5, 12)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_cameras_share_an_encoder_or_get_one_each():
    meta = {"left": {"shape": (3, 16, 16), "kind": "rgb"}, "right": {"shape": (3, 16, 16), "kind": "rgb"},
            "pos": {"shape": (2,), "kind": "low_dim"}}
    obs = {"left": torch.rand(2, 3, 3, 16, 16), "right": torch.rand(2, 3, 3, 16, 16), "pos": torch.rand(2, 3, 2)}
    separate = ObservationEncoder(meta, VisionConfig(feature_dim=5, conv_channels=(4,)))
    shared = ObservationEncoder(meta, VisionConfig(feature_dim=5, conv_channels=(4,), shared=True))
    assert len(separate.cameras) == 2 and len(shared.cameras) == 1
    for encoder in (separate, shared):
        assert encoder(obs).shape == (2, 3, 12) == (2, 3, encoder.out_dim)
    # The shared encoder applied to each camera alone gives the same features as the batched call.
    single = shared.cameras["shared"]
    expected = torch.cat([single(obs[k].flatten(0, 1)).reshape(2, 3, 5) for k in ("left", "right")], dim=-1)
    torch.testing.assert_close(shared(obs)[..., :10], expected)


def test_frozen_norm_needs_weights_and_weights_mean_imagenet_statistics(tmp_path):
    import torchvision

    with pytest.raises(ValueError, match="identity"):
        VisionConfig(backbone="resnet18", norm="frozen")
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    meta = {"obs": {"image": {"shape": (3, 32, 32), "kind": "rgb"}}, "action": {"shape": (2,)}}
    policy = make_policy({"name": "bc", "vision": {"backbone": "resnet18", "norm": "frozen", "weights": str(path)}}, meta)
    assert policy.normalizer.modes["image"] == "imagenet"
    policy.normalizer.fit({"image": np.zeros((4, 32, 32, 3), np.uint8), "action": np.zeros((4, 2))})
    center, scale = policy.normalizer.affine("image")
    torch.testing.assert_close(center.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(scale.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    act = make_policy({"name": "act", "backbone_weights": str(path), "d_model": 32, "n_heads": 4, "dim_feedforward": 32,
                       "horizon": 2, "n_action_steps": 2}, meta)
    assert act.config.backbone_norm == "frozen" and act.normalizer.modes["image"] == "imagenet"
