"""Checking observations as a robot or an env produces them, before they reach a network.

Accepted per key: numpy arrays or torch tensors, one step `(*shape)` or a batch `(B, *shape)`;
images uint8 (0-255) or float (0-1), channels last (H, W, C) or first (C, H, W); low-dim vectors
of any real dtype (float64 included). Anything else raises `ObservationError`, one sentence that
names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from il_policies.data.images import hwc, is_image_shape


class ObservationError(ValueError):
    """An observation that is missing, mis-shaped, of the wrong dtype, or not finite."""


def check_observation(obs: Mapping[str, Any], shape_meta: Mapping) -> tuple[dict[str, Any], bool, bool]:
    """Validate one step of observations.

    Returns `(observations as (B, ...) arrays/tensors, was_batched, was_numpy)`. Images come back
    in whatever layout they came in; `prepare_batch` handles both.
    """
    if not isinstance(obs, Mapping):
        raise ObservationError(f"observations must be a dict of arrays keyed {sorted(shape_meta['obs'])}, not {type(obs).__name__}")
    missing = sorted(set(shape_meta["obs"]) - set(obs))
    if missing:
        raise ObservationError(f"observation key(s) {missing} are missing (got {sorted(obs)}; the policy needs {sorted(shape_meta['obs'])})")
    checked, batched_flags, numpy_flags = {}, set(), set()
    for key, meta in shape_meta["obs"].items():
        value = obs[key]
        numpy_flags.add(not isinstance(value, torch.Tensor))
        if not isinstance(value, torch.Tensor):
            try:
                value = np.asarray(value)
            except Exception:
                raise ObservationError(f"observation {key!r} is a {type(value).__name__}, not an array") from None
        shape = tuple(meta["shape"])
        dtype = value.dtype
        is_float = dtype.is_floating_point if isinstance(value, torch.Tensor) else np.issubdtype(dtype, np.floating)
        if meta["kind"] == "rgb":
            is_uint8 = dtype in (torch.uint8, np.uint8)
            if not (is_uint8 or is_float):
                raise ObservationError(f"observation {key!r} has dtype {dtype}; images must be uint8 (0-255) or float (0-1)")
            if not is_image_shape(value.shape[-3:], shape) or value.ndim not in (3, 4):
                raise ObservationError(
                    f"observation {key!r} has shape {tuple(value.shape)}; expected {hwc(shape)} (HWC) or {shape} (CHW), "
                    "optionally with a leading batch dimension"
                )
            batched = value.ndim == 4
        else:
            is_real = is_float or dtype in (torch.int32, torch.int64, np.int32, np.int64, torch.bool, np.bool_)
            if not is_real:
                raise ObservationError(f"observation {key!r} has dtype {dtype}; expected a real-valued array")
            if tuple(value.shape[-len(shape):]) != shape or value.ndim not in (len(shape), len(shape) + 1):
                raise ObservationError(f"observation {key!r} has shape {tuple(value.shape)}; expected {shape} or (batch, *{shape})")
            batched = value.ndim == len(shape) + 1
        if is_float and not _all_finite(value):
            raise ObservationError(f"observation {key!r} contains NaN or inf")
        batched_flags.add(batched)
        checked[key] = value if batched else value[None]
    if len(batched_flags) > 1:
        raise ObservationError("some observations have a batch dimension and others do not")
    return checked, batched_flags.pop(), numpy_flags == {True}


def _all_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return bool(np.isfinite(value).all())
