"""Image augmentation of a policy's camera observations, random in training and fixed at evaluation.

`ObservationAugment` is a module of every policy (`Policy.normalize_obs` runs it before the
normalizer), so it behaves by the module's mode as dropout does: in `train()` mode a random crop or
shift (and colour jitter) per sample, in `eval()` mode the center crop (or nothing), which is what
validation, the rollouts, `load_policy` and the exported ONNX graph run. Its options are part of the
policy's config, so a checkpoint carries them. Randomness comes from torch's generator on the
images' device, which the Workspace seeds and checkpoints: resuming gives the same crops.

Every observation step of one sample gets the same crop and colour factors (so that frame
differences stay motion, not augmentation); each sample and each camera gets its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from il_policies.policies.config import AugmentConfig


def crop_size(config: AugmentConfig, height: int, width: int) -> tuple[int, int]:
    """The (h, w) the network sees."""
    if config.kind != "crop":
        return height, width
    return max(1, round(config.crop_ratio * height)), max(1, round(config.crop_ratio * width))


def crop_at(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-sample crops: images (B, T, C, H, W), top / left (B,) -> (B, T, C, height, width)."""
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, height)
    cols = left[:, None] + torch.arange(width, device=images.device)  # (B, width)
    samples = torch.arange(images.shape[0], device=images.device)[:, None, None]
    # Advanced indices around slices put their dimensions first: (B, height, width, T, C).
    cropped = images[samples, :, :, rows[:, :, None], cols[:, None, :]]
    return rearrange(cropped, "b h w t c -> b t c h w")


def color_jitter(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation of (B, T, C, H, W) images in [0, 1], one factor set per sample."""
    shape = (images.shape[0], 1, 1, 1, 1)
    factor = lambda: 1.0 + strength * (2.0 * torch.rand(shape, device=images.device) - 1.0)  # noqa: E731
    images = images * factor()
    mean = images.mean(dim=(-3, -2, -1), keepdim=True)
    images = (images - mean) * factor() + mean
    if images.shape[2] == 3:
        gray = (images * images.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(dim=2, keepdim=True)
        images = (images - gray) * factor() + gray
    return images.clamp(0.0, 1.0)


class ObservationAugment(nn.Module):
    """`{key: (B, T, *shape)}` observations -> the same with every camera augmented (training) or
    center-cropped (evaluation); low-dim keys pass through. `network_obs_meta` is the observation
    schema the network is built for (cameras at the cropped size)."""

    def __init__(self, config: AugmentConfig, obs_meta: Mapping[str, Mapping]):
        super().__init__()
        self.config = config
        self.rgb_keys = sorted(k for k, m in obs_meta.items() if m["kind"] == "rgb")
        self.network_obs_meta = {key: dict(meta) for key, meta in obs_meta.items()}
        for key in self.rgb_keys:
            c, h, w = obs_meta[key]["shape"]
            self.network_obs_meta[key]["shape"] = (c, *crop_size(config, h, w))

    def forward(self, obs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(obs)
        if not self.config.enabled:
            return out
        for key in self.rgb_keys:
            out[key] = self._augment(obs[key]) if self.training else self._evaluate(obs[key])
        return out

    def _evaluate(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.kind != "crop":
            return images
        height, width = images.shape[-2:]
        h, w = crop_size(self.config, height, width)
        top, left = (height - h) // 2, (width - w) // 2
        return images[..., top : top + h, left : left + w]

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        height, width = images.shape[-2:]
        if self.config.kind == "crop":
            h, w = crop_size(self.config, height, width)
        elif self.config.kind == "shift" and self.config.shift_pixels > 0:
            pad = self.config.shift_pixels
            padded = F.pad(rearrange(images, "b t c h w -> (b t) c h w"), (pad, pad, pad, pad), mode="replicate")
            images = rearrange(padded, "(b t) c h w -> b t c h w", b=batch)
            h, w = height, width
            height, width = height + 2 * pad, width + 2 * pad
        else:
            h, w = height, width
        if (h, w) != (height, width):
            top = torch.randint(0, height - h + 1, (batch,), device=images.device)
            left = torch.randint(0, width - w + 1, (batch,), device=images.device)
            images = crop_at(images, top, left, h, w)
        if self.config.color_jitter > 0:
            images = color_jitter(images, self.config.color_jitter)
        return images


__all__ = ["ObservationAugment", "color_jitter", "crop_at", "crop_size"]
