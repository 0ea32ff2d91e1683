"""Camera images: stored and delivered by envs and robots channels-last (H, W, C), uint8; networks
see channels-first (C, H, W) float in [0, 1]. Every conversion between the two goes through here."""

from __future__ import annotations

import torch


def chw(hwc_shape) -> tuple[int, int, int]:
    """(H, W, C) -> (C, H, W)."""
    h, w, c = (int(s) for s in hwc_shape)
    return c, h, w


def hwc(chw_shape) -> tuple[int, int, int]:
    """(C, H, W) -> (H, W, C)."""
    c, h, w = (int(s) for s in chw_shape)
    return h, w, c


def is_image_shape(trailing, chw_shape) -> bool:
    """Whether a trailing (H, W, C) or (C, H, W) shape is an image of `chw_shape`."""
    return tuple(trailing) in (tuple(chw_shape), hwc(chw_shape))


def to_network_image(x: torch.Tensor, chw_shape, key: str) -> torch.Tensor:
    """(..., H, W, C) or (..., C, H, W), uint8 (0-255) or float (0-1) -> float32 (..., C, H, W) in [0, 1]."""
    if tuple(x.shape[-3:]) == hwc(chw_shape) and tuple(x.shape[-3:]) != tuple(chw_shape):
        x = x.movedim(-1, -3)  # a view
    elif tuple(x.shape[-3:]) != tuple(chw_shape):
        raise ValueError(f"rgb key {key!r}: expected trailing shape {hwc(chw_shape)} (HWC) or {tuple(chw_shape)} (CHW), "
                         f"got {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


__all__ = ["chw", "hwc", "is_image_shape", "to_network_image"]
