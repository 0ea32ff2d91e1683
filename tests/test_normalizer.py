from __future__ import annotations

import numpy as np
import pytest
import torch

from il_policies.data.normalizer import Normalizer

META = {
    "obs": {"state": {"shape": (4,), "kind": "low_dim"}, "image": {"shape": (3, 6, 5), "kind": "rgb"}},
    "action": {"shape": (2,)},
}


def _data(rng):
    state = rng.normal(loc=[1, -2, 50, 3], scale=[0.1, 2, 30, 1], size=(500, 4)).astype(np.float32)
    state[:, 3] = 3.0  # a constant dimension must not divide by zero
    image = rng.integers(0, 256, size=(500, 6, 5, 3), dtype=np.uint8)
    action = rng.uniform(-4, 9, size=(500, 2)).astype(np.float32)
    return {"state": state, "image": image, "action": action}


@pytest.mark.parametrize("mode", ["gaussian", "minmax", "identity"])
@pytest.mark.parametrize("per_pixel", [False, True])
def test_round_trip_and_statistics(mode, per_pixel):
    data = _data(np.random.default_rng(0))
    normalizer = Normalizer(META, {"low_dim": mode, "rgb": mode, "action": mode}, per_pixel=per_pixel)
    normalizer.fit(data)
    state = torch.from_numpy(data["state"])
    normalized = normalizer.normalize("state", state)
    torch.testing.assert_close(normalizer.unnormalize("state", normalized), state, rtol=1e-5, atol=1e-4)
    assert torch.all(normalized[:, 3] == 0) if mode != "identity" else True
    if mode == "gaussian":
        torch.testing.assert_close(normalized[:, :3].mean(0), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(normalized[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    if mode == "minmax":
        action = normalizer.normalize("action", torch.from_numpy(data["action"]))
        torch.testing.assert_close(action.min(0).values, -torch.ones(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(action.max(0).values, torch.ones(2), atol=1e-5, rtol=0)
    image = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).float() / 255
    expected_shape = (3, 6, 5) if per_pixel else (3, 1, 1)
    assert normalizer.stats["image"].center.shape == expected_shape
    torch.testing.assert_close(normalizer.unnormalize("image", normalizer.normalize("image", image)), image, rtol=1e-5, atol=1e-5)


def test_statistics_travel_in_the_state_dict():
    data = _data(np.random.default_rng(1))
    fitted = Normalizer(META)
    fitted.fit(data)
    fresh = Normalizer(META)
    assert not bool(fresh.fitted)
    fresh.load_state_dict(fitted.state_dict())
    assert bool(fresh.fitted)
    x = torch.randn(7, 2)
    torch.testing.assert_close(fresh.unnormalize("action", x), fitted.unnormalize("action", x))


def test_precision_with_large_offsets():
    # E[x^2] - E[x]^2 in float32 would lose the std of values around 1e4 entirely.
    values = (1e4 + np.random.default_rng(2).normal(scale=0.01, size=(5000, 2))).astype(np.float64)
    normalizer = Normalizer({"obs": {}, "action": {"shape": (2,)}})
    normalizer.fit({"action": values})
    assert np.allclose(normalizer.stats["action"].scale.numpy(), values.std(0), rtol=1e-2)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'zscore' for key 'state'"):
        Normalizer(META, {"state": "zscore"})


@pytest.mark.parametrize("per_pixel", [False, True])
def test_image_statistics_are_exact_whatever_the_slice_size(monkeypatch, per_pixel):
    from il_policies.data import normalizer as module

    image = np.random.default_rng(3).integers(0, 256, size=(300, 6, 5, 3), dtype=np.uint8)
    image[:, 0, 0, 1] = 200  # a constant pixel keeps scale 1 per pixel
    fits = []
    for slice_bytes in (1, 4 * 6 * 5 * 3 * 7, 1 << 30):  # one frame, 7 frames, all frames per slice
        monkeypatch.setattr(module, "_FIT_IMAGE_BYTES", slice_bytes)
        normalizer = Normalizer(META, per_pixel=per_pixel)
        normalizer.fit({"state": np.zeros((300, 4), np.float32), "image": image, "action": np.zeros((300, 2), np.float32)})
        fits.append(normalizer.affine("image"))
    chw = np.moveaxis(image.astype(np.float64) / 255.0, -1, 1)
    axes = (0,) if per_pixel else (0, 2, 3)
    mean, std = chw.mean(axis=axes, keepdims=True)[0], chw.std(axis=axes, keepdims=True)[0]
    std = np.where(std < 1e-6, 1.0, std)
    for center, scale in fits:
        np.testing.assert_allclose(center.numpy(), mean, rtol=1e-6)
        np.testing.assert_allclose(scale.numpy(), std, rtol=1e-6)
        assert torch.equal(center, fits[0][0]) and torch.equal(scale, fits[0][1])
    if per_pixel:
        assert fits[0][1][1, 0, 0] == 1.0
