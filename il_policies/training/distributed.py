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

    Chunk-aligned (`blocks`: each sample's block, the store chunk its window reads): the epoch's
    permutation visits the blocks in a random order and shuffles the samples within each run of
    `blocks_per_shuffle` consecutive blocks, so a lazily read chunk serves all its windows while it
    is cached. It is still a permutation of every sample: each window is seen exactly once an epoch,
    as in the random order; what it gives up is independence between a batch's samples, which come
    from `blocks_per_shuffle` chunks instead of the whole dataset.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int, ctx: DistributedContext = DistributedContext(),
                 blocks: np.ndarray | None = None, blocks_per_shuffle: int = 16):
        self.global_batch = batch_size * ctx.world_size
        if n_samples < self.global_batch:
            raise ValueError(
                f"the training set has {n_samples} samples, fewer than one global batch of {self.global_batch}; "
                "lower training.batch_size"
            )
        if blocks is not None and len(blocks) != n_samples:
            raise ValueError(f"blocks name {len(blocks)} samples' blocks for {n_samples} samples")
        if blocks_per_shuffle < 1:
            raise ValueError(f"blocks_per_shuffle must be >= 1, got {blocks_per_shuffle}")
        self.n_samples, self.batch_size, self.seed, self.ctx = n_samples, batch_size, seed, ctx
        self.batches_per_epoch = n_samples // self.global_batch
        self.blocks_per_shuffle = blocks_per_shuffle
        self.block_of_sample = None if blocks is None else np.unique(np.asarray(blocks), return_inverse=True)[1].reshape(-1)

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.block_of_sample is None:
            return rng.permutation(self.n_samples)
        visit = np.empty(self.block_of_sample.max() + 1, dtype=np.int64)
        visit[rng.permutation(len(visit))] = np.arange(len(visit))  # when each block is visited
        run = visit[self.block_of_sample] // self.blocks_per_shuffle
        return np.lexsort((rng.random(self.n_samples), run))  # by run, shuffled within it

    def iter_from(self, step: int) -> Iterator[list[int]]:
        """Yield this rank's index lists for steps `step`, `step + 1`, ... forever."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            permutation = self.permutation(epoch)
            for b in range(offset, self.batches_per_epoch):
                start = b * self.global_batch + self.ctx.rank * self.batch_size
                yield permutation[start : start + self.batch_size].tolist()
            epoch, offset = epoch + 1, 0
