"""The speed layer: opt-in transformations of a reference policy that compute the same function
with less work. Policy and `nn/` code never depend on it; tests prove each transformation equal to
the reference (`tests/test_accel.py`, `tests/test_backends.py`).

- `accelerate(policy)`: module swaps (`swaps.py`) and channels-last ResNet convolutions, in place.
  Used for training with `training.accel=true` and for inference with `load_policy(..., accel=True)`;
  exported ONNX files are made from the accelerated network.
- `backends.py`: ONNX export and the onnxruntime / OpenVINO backends of `load_policy`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from il_policies.accel.swaps import (
    FastDropout,
    FastMultiheadAttention,
    FirstTokenEncoderLayer,
    MatmulAdaptiveAvgPool2d,
    MatmulConv1d,
    OneDNNLinear,
    ZeroTargetDecoderLayer,
)
from il_policies.nn.transformer import DecoderLayer, EncoderLayer
from il_policies.nn.vision import ResNetBackbone


def _swap(module: nn.Module, reference: type, fast: type) -> None:
    if type(module) is reference:
        module.__class__ = fast


def _act_swaps(policy) -> None:
    # ACT reads only the CLS output of its CVAE encoder, and its decoder starts from a zero target.
    if policy.config.use_vae:
        _swap(policy.vae_encoder.layers[-1], EncoderLayer, FirstTokenEncoderLayer)
    _swap(policy.decoder.layers[0], DecoderLayer, ZeroTargetDecoderLayer)


# Swaps that rely on how a policy calls its networks, by registry name.
POLICY_SWAPS = {"act": _act_swaps}


def accelerate(policy: nn.Module) -> nn.Module:
    """Swap the policy's modules for their faster equivalents, in place; returns the policy."""
    for module in policy.modules():
        _swap(module, nn.Dropout, FastDropout)
        _swap(module, nn.MultiheadAttention, FastMultiheadAttention)
        _swap(module, nn.Linear, OneDNNLinear)
        _swap(module, NonDynamicallyQuantizableLinear, OneDNNLinear)  # nn.MultiheadAttention's out_proj
        _swap(module, nn.AdaptiveAvgPool2d, MatmulAdaptiveAvgPool2d)
        _swap(module, nn.Conv1d, MatmulConv1d)
        if isinstance(module, ResNetBackbone):
            module.to(memory_format=torch.channels_last)
    swaps = POLICY_SWAPS.get(getattr(policy, "name", None))
    if swaps is not None:
        swaps(policy)
    return policy


__all__ = ["POLICY_SWAPS", "accelerate"]
