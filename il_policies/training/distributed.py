"""Data-parallel training on torch.distributed: the process context and a resumable batch order.

Launched by `torchrun --nproc_per_node=N train.py ...` (or across machines with `--nnodes`), the
Workspace finds RANK / WORLD_SIZE / LOCAL_RANK in the environment. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistributedContext":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (so that all ranks take the same branch)."""
        if not self.enabled:
            return flag
        value = torch.tensor([0.0 if flag else 1.0])
        dist.all_reduce(value)
        return value.item() == 0.0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


class GlobalBatchOrder:
    """Shuffled batches that depend only on (seed, epoch, step), for any number of processes.

    Each epoch is a seeded permutation cut into global batches of `batch_size * world_size`
    samples; rank r takes the r-th slice of each. Hence a run on W processes with batch b sees
    exactly the samples of a one-process run with batch W*b, and resuming at step k restarts the
    order exactly where it stopped. The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int, ctx: DistributedContext = DistributedContext()):
        self.global_batch = batch_size * ctx.world_size
        if n_samples < self.global_batch:
            raise ValueError(
                f"the training set has {n_samples} samples, fewer than one global batch of {self.global_batch}; "
                "lower training.batch_size"
            )
        self.n_samples, self.batch_size, self.seed, self.ctx = n_samples, batch_size, seed, ctx
        self.batches_per_epoch = n_samples // self.global_batch

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def iter_from(self, step: int) -> Iterator[list[int]]:
        """Yield this rank's index lists for steps `step`, `step + 1`, ... forever."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
            for b in range(offset, self.batches_per_epoch):
                start = b * self.global_batch + self.ctx.rank * self.batch_size
                yield permutation[start : start + self.batch_size].tolist()
            epoch, offset = epoch + 1, 0
