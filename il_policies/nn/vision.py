"""Image backbones that return a feature map (B, C, h, w) for transformer tokens.

- `ResNetBackbone`: torchvision ResNet18/34/50 up to `layer4` (no pooling, no classifier), random init
  (nothing is downloaded); `weights_path` loads a local torchvision state_dict file (e.g. the
  ImageNet weights saved beforehand). `frozen_bn=True` uses torchvision's FrozenBatchNorm2d (the
  statistics and affine terms stay fixed, as DETR and ACT do); `False` trains ordinary BatchNorm.
- `ConvBackbone`: a few strided 3x3 convolutions with GroupNorm, for quick CPU runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class ResNetBackbone(nn.Module):
    def __init__(self, name: str = "resnet18", weights_path: str | None = None, frozen_bn: bool = True):
        super().__init__()
        if name not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"unknown ResNet {name!r}: use resnet18, resnet34 or resnet50")
        net = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        if weights_path:
            path = Path(weights_path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights file {path} does not exist (no download is attempted)")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ValueError(f"backbone weights {path} do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.out_channels = net.fc.in_features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


class ConvBackbone(nn.Module):
    """Stride-2 3x3 convolutions + GroupNorm + ReLU, one stage per channel count (96x96 -> 3x3 with five)."""

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (32, 64, 128), groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(min(groups, out), out), nn.ReLU()]
            width = out
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


def make_backbone(name: str, in_channels: int = 3, weights_path: str | None = None, frozen_bn: bool = True,
                  conv_channels: Sequence[int] = (32, 64, 128)) -> nn.Module:
    """`resnet18` / `resnet34` / `resnet50` or `conv` (the small CPU backbone)."""
    if name == "conv":
        return ConvBackbone(in_channels, conv_channels)
    if in_channels != 3:
        raise ValueError(f"a ResNet backbone takes 3-channel images, got {in_channels}")
    return ResNetBackbone(name, weights_path, frozen_bn)


__all__ = ["ConvBackbone", "ResNetBackbone", "make_backbone"]
