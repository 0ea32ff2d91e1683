"""What the Workspace needs around the model: the device, seeding, gradient clipping, and the RNG
states a checkpoint carries so that a resumed run draws exactly what an uninterrupted one draws."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from il_policies.training.distributed import DistributedContext


def resolve_device(name: str, ctx: DistributedContext) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`, without its multiply of every gradient by a coefficient that
    is exactly 1 when the norm is within bounds (there to avoid a device sync; on a CPU it is a full
    read and write of the gradients, 206 MB for ACT). Returns the total norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    # torch's own coefficient, so that exactly the steps torch scales are scaled (a norm just under the
    # bound is, through the 1e-6; a NaN norm too).
    if not torch.clamp(max_norm / (total + 1e-6), max=1.0) == 1.0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def capture_rng() -> dict[str, Any]:
    """Python's, numpy's, torch's and CUDA's global RNG states, as tensors and plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
