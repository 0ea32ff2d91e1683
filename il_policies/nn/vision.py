"""The image encoders every image policy shares: a backbone that returns a feature map, and pooling.

Backbones (`make_backbone`) return `(B, C', h, w)`:
- `ConvBackbone`: stride-2 3x3 convolutions with GroupNorm and ReLU, one stage per width (quick on a CPU).
- `ResNetBackbone`: torchvision's ResNet18/34 up to `layer4`, randomly initialized (nothing is
  downloaded) or loaded from a local state_dict file. Normalization `group` (GroupNorm with 16
  channels per group, as Diffusion Policy trains its ResNet from scratch), `batch` (trainable
  BatchNorm) or `frozen` (FrozenBatchNorm2d, as DETR and ACT use with ImageNet weights; refused
  without weights, where every frozen layer would be the identity).

`ImageEncoder` = backbone -> pooling -> linear to `feature_dim`, with pooling `avgpool` (global
average), `flatten` (every cell of the map), `spatial_softmax` (robomimic's keypoints: a 1x1
convolution to K maps, a softmax over each map's positions at a learned temperature, and each map's
expected (x, y)) or `grid` (the map average-pooled to a small grid, every cell kept: where things
are, coarsely). ACT takes the backbone's feature map itself as its transformer's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from il_policies.policies.config import VisionConfig

RESNETS = ("resnet18", "resnet34")


def group_norm(channels: int) -> nn.GroupNorm:
    """Diffusion Policy's replacement of a ResNet's BatchNorm: 16 channels per group."""
    return nn.GroupNorm(max(1, channels // 16), channels)


NORM_LAYERS = {"group": group_norm, "batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d}


class ResNetBackbone(nn.Module):
    def __init__(self, name: str = "resnet18", norm: str = "group", weights_path: str | None = None):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}: use one of {RESNETS}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"unknown ResNet normalization {norm!r}: use one of {sorted(NORM_LAYERS)}")
        if norm == "frozen" and not weights_path:
            raise ValueError("a frozen-BatchNorm ResNet needs a weights file: randomly initialized, every frozen layer is the identity")
        net = getattr(torchvision.models, name)(weights=None, norm_layer=NORM_LAYERS[norm])
        if weights_path:
            _load_weights(net, name, Path(weights_path).expanduser(), norm)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = net.fc.in_features

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


def _load_weights(net: nn.Module, name: str, path: Path, norm: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist (no download is attempted)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The classifier is not part of the backbone; GroupNorm has no place for BatchNorm's statistics.
    suffixes = ("num_batches_tracked", "running_mean", "running_var") if norm == "group" else ("num_batches_tracked",)
    unused = lambda key: key.startswith("fc.") or key.endswith(suffixes)  # noqa: E731
    missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not unused(k)}, strict=False)
    missing = [k for k in missing if not unused(k)]
    if missing or unexpected:
        raise ValueError(f"backbone weights {path} do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")


class ConvBackbone(nn.Module):
    """Stride-2 3x3 convolutions + GroupNorm + ReLU, one stage per width (96x96 -> 3x3 with five)."""

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


def make_backbone(name: str, in_channels: int = 3, norm: str = "group", weights_path: str | None = None,
                  conv_channels: Sequence[int] = (32, 64, 128)) -> nn.Module:
    """`conv` (the small backbone; always GroupNorm) or `resnet18` / `resnet34` with `norm`."""
    if name == "conv":
        return ConvBackbone(in_channels, conv_channels)
    if in_channels != 3:
        raise ValueError(f"a ResNet backbone takes 3-channel images, got {in_channels}")
    return ResNetBackbone(name, norm, weights_path)


class SpatialSoftmax(nn.Module):
    """Feature map (B, C, h, w) -> K keypoints (B, 2K): for each of K maps (a 1x1 convolution of the
    features), the expected (x, y) in [-1, 1] under a softmax over its positions at a learned temperature."""

    def __init__(self, in_channels: int, height: int, width: int, num_keypoints: int = 32):
        super().__init__()
        self.keypoint_maps = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))  # temperature 1 at the start
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)  # (h*w, 2)
        self.out_dim = 2 * num_keypoints

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.keypoint_maps(features).flatten(2)  # (B, K, h*w)
        attention = F.softmax(logits / self.log_temperature.exp(), dim=-1)
        return (attention @ self.grid).flatten(1)  # (B, K, 2) -> (B, 2K), (x, y) per keypoint


class GlobalAveragePool(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.out_dim = in_channels

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(dim=(-2, -1))


class GridPool(nn.Module):
    """Average-pool the feature map to a `grid` x `grid` map (or keep it when smaller) and keep every cell."""

    def __init__(self, in_channels: int, height: int, width: int, grid: int = 4):
        super().__init__()
        self.size = (min(grid, height), min(grid, width))
        self.average = nn.Identity() if self.size == (height, width) else nn.AdaptiveAvgPool2d(self.size)
        self.out_dim = in_channels * self.size[0] * self.size[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.average(features).flatten(1)


class ImageEncoder(nn.Module):
    """One camera: `(B, C, H, W)` normalized image -> `(B, feature_dim)` (backbone, pooling, linear)."""

    def __init__(self, image_shape: Sequence[int], config: VisionConfig):
        super().__init__()
        channels, height, width = (int(s) for s in image_shape)
        self.backbone = make_backbone(config.backbone, channels, config.norm, config.weights, config.conv_channels)
        with torch.no_grad():
            _, c, h, w = self.backbone.eval()(torch.zeros(1, channels, height, width)).shape
        self.backbone.train()
        if config.pool == "spatial_softmax":
            self.pool = SpatialSoftmax(c, h, w, config.num_keypoints)
        elif config.pool == "avgpool":
            self.pool = GlobalAveragePool(c)
        elif config.pool == "flatten":
            self.pool = GridPool(c, h, w, max(h, w))
        else:
            self.pool = GridPool(c, h, w, config.grid)
        self.head = nn.Linear(self.pool.out_dim, config.feature_dim)
        self.out_dim = config.feature_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.backbone(image)))


__all__ = ["ConvBackbone", "ImageEncoder", "ResNetBackbone", "SpatialSoftmax", "group_norm", "make_backbone"]
