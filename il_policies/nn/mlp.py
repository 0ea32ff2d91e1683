"""Multi-layer perceptron, the shared building block of the low-dim networks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(
    in_dim: int,
    hidden_dims: Sequence[int],
    out_dim: int,
    activation: type[nn.Module] = nn.ReLU,
    dropout: float = 0.0,
    layer_norm: bool = False,
) -> nn.Sequential:
    """Linear layers of widths `hidden_dims` with activations between them; the output is linear."""
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in hidden_dims:
        layers.append(nn.Linear(width, hidden))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(activation())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)
