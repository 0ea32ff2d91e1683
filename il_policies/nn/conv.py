"""A small convolutional image encoder that runs well on a CPU, for any declared image size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ConvEncoder(nn.Module):
    """Strided 3x3 convolutions with GroupNorm, global average pooling to a grid, then a linear map.

    GroupNorm instead of BatchNorm: batch statistics would make a policy's action depend on the other
    samples in its batch and differ between training and a robot's batch of one.
    """

    def __init__(
        self,
        in_channels: int,
        out_dim: int,
        channels: Sequence[int] = (32, 64, 128),
        pool_size: int = 4,
        groups: int = 8,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for out_channels in channels:
            layers += [
                nn.Conv2d(width, out_channels, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(min(groups, out_channels), out_channels),
                nn.SiLU(),
            ]
            width = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pool_size), nn.Flatten())
        self.head = nn.Linear(width * pool_size * pool_size, out_dim)
        self.out_dim = out_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalized image -> (B, out_dim)."""
        return self.head(self.features(image))
