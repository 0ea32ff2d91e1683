"""Loss helpers shared by the policies."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, is_pad: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (B, T, ...) over the entries whose timestep is not padding.

    Padded timesteps contribute neither to the value nor to the gradient; the mean is over real
    entries only, so a batch with much padding is not down-weighted.
    """
    if is_pad is None:
        return values.mean()
    keep = (~is_pad).to(values.dtype).reshape(*is_pad.shape, *([1] * (values.dim() - is_pad.dim())))
    keep = keep.expand_as(values)
    return (values * keep).sum() / keep.sum().clamp_min(1.0)
