"""Image backbones that return a feature map (B, C, h, w) for transformer tokens.

- `ResNetBackbone`: torchvision ResNet18/34/50 up to `layer4` (no pooling, no classifier), random init
  (nothing is downloaded); `weights_path` loads a local torchvision state_dict file (e.g. the
  ImageNet weights saved beforehand). `frozen_bn=True` uses torchvision's FrozenBatchNorm2d (the
  statistics and affine terms stay fixed, as DETR and ACT do); `False` trains ordinary BatchNorm.
  Runs in channels_last memory format (oneDNN's fast convolution layout on CPUs). Without autograd
  (inference) and with frozen BatchNorm, each BatchNorm is folded into its convolution's weight and
  bias (the same affine map, one pass fewer per layer), and on a CPU the folded weights are
  prepacked into oneDNN's layout with ReLU fused in; the folded and packed copies are rebuilt
  whenever a weight or statistic (or, for the packed ones, the input shape) changes.
- `ConvBackbone`: a few strided 3x3 convolutions with GroupNorm, for quick CPU runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from il_policies.nn.cache import WeightCache
from il_policies.nn.threads import wide


class ResNetBackbone(nn.Module):
    def __init__(self, name: str = "resnet18", weights_path: str | None = None, frozen_bn: bool = True,
                 channels_last: bool = True):
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
        self.channels_last, self.frozen_bn = channels_last, frozen_bn
        if channels_last:
            self.body.to(memory_format=torch.channels_last)
        self._folded = WeightCache()
        self._packed = WeightCache()
        self._source_names: list | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if self.frozen_bn and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._forward_folded(image)  # (a compiled graph folds BatchNorm itself)
        return self.body(image)

    # ---- inference with BatchNorm folded into the convolutions -----------------------------------
    def _pairs(self):
        """(conv, bn) pairs in the order the folded forward uses them."""
        stem_conv, stem_bn = self.body[0], self.body[1]
        pairs = [(stem_conv, stem_bn)]
        for layer in self.body[4:]:
            for block in layer:
                n = 3 if hasattr(block, "conv3") else 2
                pairs += [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1)]
                if block.downsample is not None:
                    pairs.append((block.downsample[0], block.downsample[1]))
        return pairs

    def _fold(self) -> dict:
        def fold() -> dict:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            folded = {}
            for conv, bn in self._pairs():
                scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
                weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=fmt)
                folded[conv] = (weight, bn.bias - bn.running_mean * scale)
            return folded

        return self._folded.get(self._sources(), fold)

    def _sources(self) -> list[torch.Tensor]:
        """Every parameter and buffer of the body, looked up by (module, name) pairs found once: walking the
        module tree at every call cost ~0.2 ms; a replaced tensor is still picked up."""
        if self._source_names is None:
            self._source_names = [(m, name) for m in self.body.modules()
                                  for name, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]]
        return [getattr(m, name) for m, name in self._source_names]

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        folded = self._fold()
        if _onednn_packed_conv() and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._walk(x, self._packed_conv(folded, tuple(x.shape)))
        return self._walk(x, functools.partial(_folded_conv, folded))

    def _packed_conv(self, folded: dict, input_shape: tuple):
        """Batch-1 CPU inference: every folded weight prepacked into oneDNN's layout for its input size
        (the layer3/layer4 convolutions on 6x6 and 3x3 maps run 1.4-3x faster than with a reorder at each
        call), ReLU fused into the convolution. Rebuilt when a weight or the input shape changes."""
        def pack() -> dict:
            sizes = {}

            def record(conv, x, relu, residual=None):
                sizes[conv] = list(x.shape)
                return _folded_conv(folded, conv, x, relu, residual)

            self._walk(torch.zeros(input_shape).contiguous(memory_format=torch.channels_last), record)
            return {conv: (torch._C._nn.mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), list(conv.padding),
                                                                      list(conv.stride), list(conv.dilation), conv.groups, sizes[conv]), bias)
                    for conv, (weight, bias) in folded.items()}

        packed = self._packed.get([], pack, extra=(self._folded.generation, input_shape))

        def conv(module, x, relu, residual=None):
            weight, bias = packed[module]
            args = (list(module.padding), list(module.stride), list(module.dilation), module.groups)
            with wide():
                if residual is not None:  # relu(conv(x) + residual) in one pass
                    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args, "add", None, "relu", [], "")
                return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "relu" if relu else "none", [], "")
        return conv

    def _walk(self, x: torch.Tensor, conv) -> torch.Tensor:
        """The network with BatchNorm folded: `conv(module, x, relu, residual=None)` runs a convolution with
        its BN, then ReLU, or `relu(conv(x) + residual)` (a block's last convolution)."""
        x = self.body[3](conv(self.body[0], x, True))  # stem: conv, bn, relu, maxpool
        for layer in self.body[4:]:
            for block in layer:
                n = 3 if hasattr(block, "conv3") else 2
                identity = conv(block.downsample[0], x, False) if block.downsample is not None else x
                out = x
                for i in range(1, n):
                    out = conv(getattr(block, f"conv{i}"), out, True)
                x = conv(getattr(block, f"conv{n}"), out, True, residual=identity)
        return x


def _folded_conv(folded: dict, module: nn.Conv2d, x: torch.Tensor, relu: bool, residual=None) -> torch.Tensor:
    weight, bias = folded[module]
    with wide():
        out = F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if residual is not None:
        out = out.add_(residual)
    return F.relu_(out) if relu else out


@functools.cache
def _onednn_packed_conv() -> bool:
    """Whether this torch build has oneDNN's prepacked convolution (and it computes a convolution)."""
    try:
        x, w = torch.ones(1, 2, 3, 3).contiguous(memory_format=torch.channels_last), torch.ones(4, 2, 1, 1)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [0, 0], [1, 1], [1, 1], 1, [1, 2, 3, 3])
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
        fused = torch.ops.mkldnn._convolution_pointwise.binary(x, out, packed, None, [0, 0], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
        return bool(torch.equal(out, torch.full((1, 4, 3, 3), 2.0)) and torch.equal(fused, torch.full((1, 4, 3, 3), 4.0)))
    except (AttributeError, RuntimeError):
        return False


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
