"""Per-key normalization whose statistics live in the policy's state_dict.

A checkpoint therefore carries everything needed to turn network outputs back into robot units.
Every key is normalized as `(x - center) / scale`; the modes only differ in how center and scale
are fitted:

- `gaussian`: center = mean, scale = std (z-score; "in standard deviations").
- `minmax`: center = (max + min) / 2, scale = (max - min) / 2, i.e. onto [-1, 1].
- `identity`: center 0, scale 1.
- `imagenet` (3-channel images only): ImageNet's per-channel mean and std, fixed, for a backbone
  loaded with ImageNet weights (the statistics its first layer was trained on).

Low-dim keys get one statistic per dimension. Images (already float CHW in [0, 1] when they reach
the normalizer) get one statistic per channel, or per pixel with `per_pixel=True`, as the BVAE
original uses. A dimension whose scale is (nearly) zero keeps scale 1, so a constant input maps to 0
instead of dividing by zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from einops import rearrange
from torch import nn

from il_policies.data.lazy import LazyRows

MODES = ("gaussian", "minmax", "identity", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MIN_SCALE = 1e-6
_FIT_CHUNK = 1024  # rows of a low-dim key per float64 slice
_FIT_IMAGE_BYTES = 8 << 20  # bound on an image slice's uint32 copy


def _buffer_name(key: str) -> str:
    # nn.Module buffer names may not contain dots.
    return key.replace(".", "__")


class _KeyStats(nn.Module):
    def __init__(self, stats_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("center", torch.zeros(stats_shape))
        self.register_buffer("scale", torch.ones(stats_shape))


class Normalizer(nn.Module):
    """Normalizes the keys of `shape_meta` (`{"obs": {key: {"shape", "kind"}}, "action": {"shape"}}`).

    `modes` maps a key, or a kind (`low_dim`, `rgb`, `action`), to a mode; the key wins.
    """

    def __init__(
        self,
        shape_meta: Mapping,
        modes: Mapping[str, str] | None = None,
        per_pixel: bool = False,
    ):
        super().__init__()
        modes = dict(modes or {})
        self.per_pixel = per_pixel
        self.modes: dict[str, str] = {}
        self.stats = nn.ModuleDict()
        entries = [(key, meta["kind"], tuple(meta["shape"])) for key, meta in shape_meta["obs"].items()]
        entries.append(("action", "action", tuple(shape_meta["action"]["shape"])))
        default = {"low_dim": "gaussian", "rgb": "gaussian", "action": "gaussian"}
        for key, kind, shape in entries:
            mode = modes.get(key, modes.get(kind, default[kind]))
            if mode not in MODES:
                raise ValueError(f"normalization mode {mode!r} for key {key!r} is not one of {MODES}")
            if mode == "imagenet" and (kind != "rgb" or shape[0] != 3):
                raise ValueError(f"normalization mode 'imagenet' is for 3-channel images; key {key!r} is {kind} of shape {shape}")
            self.modes[key] = mode
            if kind == "rgb" and not per_pixel:
                stats_shape = (shape[0], 1, 1)
            else:
                stats_shape = shape
            self.stats[_buffer_name(key)] = _KeyStats(stats_shape)
        self.register_buffer("fitted", torch.tensor(False))
        self._kinds = {key: kind for key, kind, _ in entries}

    @torch.no_grad()
    def fit(self, data: Mapping[str, np.ndarray], action_key: str = "action") -> None:
        """Fit from raw arrays (N, *step_shape); images as stored: uint8 (N, H, W, C)."""
        for key, kind in self._kinds.items():
            source_key = action_key if key == "action" else key
            if source_key not in data:
                raise KeyError(f"cannot fit the normalizer: no data for key {source_key!r}")
            stats = self.stats[_buffer_name(key)]
            if self.modes[key] == "imagenet":
                stats.center.copy_(torch.tensor(IMAGENET_MEAN)[:, None, None].expand_as(stats.center))
                stats.scale.copy_(torch.tensor(IMAGENET_STD)[:, None, None].expand_as(stats.scale))
                continue
            x = data[source_key]  # a LazyRows (a lazily read key) is streamed slice by slice
            center, scale = _fit_stats(x if isinstance(x, LazyRows) else np.asarray(x), kind, self.modes[key], self.per_pixel)
            stats.center.copy_(torch.as_tensor(center, dtype=torch.float32).reshape(stats.center.shape))
            stats.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(stats.scale.shape))
        self.fitted.fill_(True)

    def affine(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers `(center, scale)` of `key`: normalized = (x - center) / scale."""
        stats = self.stats[_buffer_name(key)]
        return stats.center, stats.scale

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        stats = self.stats[_buffer_name(key)]
        return (x - stats.center) / stats.scale

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        stats = self.stats[_buffer_name(key)]
        return x * stats.scale + stats.center

    def normalize_obs(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: self.normalize(key, value) for key, value in obs.items()}


def _fit_stats(x: np.ndarray, kind: str, mode: str, per_pixel: bool) -> tuple[np.ndarray, np.ndarray]:
    if kind == "rgb":
        return _fit_image_stats(x, mode, per_pixel)
    # Accumulated in chunks: a float64 copy of a whole dataset need not fit in memory.
    # Moments are taken around the first chunk's mean to avoid cancellation in E[x^2] - E[x]^2.
    count, total, total_sq, low, high, shift = 0, 0.0, 0.0, None, None, None
    for start in range(0, len(x), _FIT_CHUNK):
        chunk = x[start : start + _FIT_CHUNK].astype(np.float64)
        if shift is None:
            shift = chunk.mean(axis=0)
        count += len(chunk)
        total = total + (chunk - shift).sum(axis=0)
        total_sq = total_sq + np.square(chunk - shift).sum(axis=0)
        low = chunk.min(axis=0) if low is None else np.minimum(low, chunk.min(axis=0))
        high = chunk.max(axis=0) if high is None else np.maximum(high, chunk.max(axis=0))
    if count == 0:
        raise ValueError("cannot fit the normalizer on an empty dataset")
    if mode == "gaussian":
        mean_shifted = total / count
        return _finish(mode, shift + mean_shifted, np.sqrt(np.maximum(total_sq / count - np.square(mean_shifted), 0.0)), low, high)
    return _finish(mode, None, None, low, high)


def _fit_image_stats(x, mode: str, per_pixel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images as stored (uint8 NHWC) have exact integer sums and sums of squares, so the moments
    need no shift and no float accumulation. Each pixel's are summed over frames (a reduction along
    the contiguous frame axis, the fast one), frames `_FIT_IMAGE_BYTES` at a time (as uint32), so
    a camera stream of any length fits in a few MB; per-channel statistics add up the pixels'."""
    if len(x) == 0:
        raise ValueError("cannot fit the normalizer on an empty dataset")
    pixels = int(np.prod(x.shape[1:]))
    frames = max(1, _FIT_IMAGE_BYTES // (4 * pixels))
    total = total_sq = np.zeros(pixels, np.uint64)
    low, high = np.full(pixels, 255, np.uint8), np.zeros(pixels, np.uint8)
    for start in range(0, len(x), frames):
        flat = np.asarray(x[start : start + frames]).reshape(-1, pixels)
        wide = flat.astype(np.uint32)
        total = total + wide.sum(axis=0, dtype=np.uint64)
        total_sq = total_sq + np.multiply(wide, wide, out=wide).sum(axis=0, dtype=np.uint64)
        low, high = np.minimum(low, flat.min(axis=0)), np.maximum(high, flat.max(axis=0))
    count = len(x)
    total, total_sq, low, high = (a.reshape(x.shape[1:]) for a in (total, total_sq, low, high))
    if not per_pixel:
        count *= pixels // x.shape[-1]
        total, total_sq = total.sum(axis=(0, 1)), total_sq.sum(axis=(0, 1))
        low, high = low.min(axis=(0, 1)), high.max(axis=(0, 1))
    mean = total / count
    variance = np.maximum(total_sq / count - np.square(mean), 0.0)
    # Stored HWC in 0..255; the networks see CHW in [0, 1].
    to_chw = (lambda a: rearrange(a, "h w c -> c h w")) if per_pixel else (lambda a: a)
    return _finish(mode, to_chw(mean / 255.0), to_chw(np.sqrt(variance) / 255.0), to_chw(low / 255.0), to_chw(high / 255.0))


def _finish(mode: str, mean, std, low, high) -> tuple[np.ndarray, np.ndarray]:
    if mode == "identity":
        center, scale = np.zeros_like(low), np.ones_like(low)
    elif mode == "gaussian":
        center, scale = mean, std
    else:
        center, scale = (high + low) / 2.0, (high - low) / 2.0
    scale = np.where(scale < _MIN_SCALE, 1.0, scale)
    return center, scale
