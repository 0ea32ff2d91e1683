"""Online temporal ensembling of action chunks (ACT, Zhao et al. 2023, Algorithm 2).

The policy is queried every step; the action executed at step t is the weighted average of every
prediction made so far for step t, with weights w_i = exp(-k * i) where i = 0 is the OLDEST
prediction (k = 0.01 in the original: older predictions weigh slightly more; k = 0 is a plain mean).

Online: instead of keeping every chunk, it keeps for each of the next `chunk_size` steps the running
sums  S = sum_i w_i a_i  and  W = sum_i w_i  and the count n of predictions so far; a new prediction
for that step gets weight exp(-k * n). Memory and work per step are O(chunk_size * action_dim).
"""

from __future__ import annotations

import torch


class TemporalEnsembler:
    def __init__(self, coeff: float = 0.01, chunk_size: int = 100):
        self.coeff = float(coeff)
        self.chunk_size = int(chunk_size)
        self.reset()

    def reset(self) -> None:
        self.weighted_sum: torch.Tensor | None = None  # (B, chunk, A): slot j is step t + j
        self.weight_sum: torch.Tensor | None = None  # (chunk,)
        self.count: torch.Tensor | None = None  # (chunk,) predictions so far per slot

    def update(self, chunk: torch.Tensor) -> torch.Tensor:
        """Add the chunk predicted at this step, `(B, chunk_size, A)`; returns this step's action `(B, A)`."""
        if chunk.shape[1] != self.chunk_size:
            raise ValueError(f"expected a chunk of {self.chunk_size} actions, got {chunk.shape[1]}")
        if self.weighted_sum is None:
            self.weighted_sum = torch.zeros_like(chunk)
            self.weight_sum = chunk.new_zeros(self.chunk_size)
            self.count = chunk.new_zeros(self.chunk_size)
        weights = torch.exp(-self.coeff * self.count)  # the new prediction is the count-th for its step
        self.weighted_sum += chunk * weights[None, :, None]
        self.weight_sum += weights
        self.count += 1
        action = self.weighted_sum[:, 0] / self.weight_sum[0]
        # Advance one step: slot 0 is consumed, a fresh empty slot appears at the end.
        self.weighted_sum = torch.cat([self.weighted_sum[:, 1:], torch.zeros_like(self.weighted_sum[:, :1])], dim=1)
        self.weight_sum = torch.cat([self.weight_sum[1:], self.weight_sum.new_zeros(1)])
        self.count = torch.cat([self.count[1:], self.count.new_zeros(1)])
        return action


def offline_temporal_ensemble(chunks: list[torch.Tensor], coeff: float) -> torch.Tensor:
    """Reference: every stored chunk (chunk s predicted at step s) -> the (B, T, A) executed actions."""
    chunk_size = chunks[0].shape[1]
    actions = []
    for t in range(len(chunks)):
        preds = [chunks[s][:, t - s] for s in range(max(0, t - chunk_size + 1), t + 1)]  # oldest first
        weights = torch.exp(-coeff * torch.arange(len(preds), dtype=chunks[0].dtype))
        stacked = torch.stack(preds, dim=1)
        actions.append((stacked * weights[None, :, None]).sum(1) / weights.sum())
    return torch.stack(actions, dim=1)


__all__ = ["TemporalEnsembler", "offline_temporal_ensemble"]
