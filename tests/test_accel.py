"""The speed layer's module swaps compute the reference modules' function (values and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from il_policies.accel import accelerate
from il_policies.accel.swaps import (
    FastDropout,
    FastMultiheadAttention,
    FirstTokenEncoderLayer,
    ZeroTargetDecoderLayer,
    bernoulli_keep_mask,
)
from il_policies.nn.transformer import DecoderLayer, EncoderLayer


def swapped(module: nn.Module, cls: type) -> nn.Module:
    fast = copy.deepcopy(module)
    fast.__class__ = cls
    return fast


def fast_dropout_everywhere(module: nn.Module) -> nn.Module:
    """The reference module with only its dropout (and attention dropout) masks drawn as FastDropout draws them."""
    for m in module.modules():
        if type(m) is nn.Dropout:
            m.__class__ = FastDropout
        if type(m) is nn.MultiheadAttention:
            m.__class__ = FastMultiheadAttention
    return module


def grads(outputs: torch.Tensor, params) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, outputs.numel()).view_as(outputs)  # a loss that weighs every output differently
    return list(torch.autograd.grad((outputs * weights).sum(), list(params)))


def assert_same_function(fast_out, ref_out, fast_params, ref_params, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(fast_out, ref_out, rtol=rtol, atol=atol)
    for got, want in zip(grads(fast_out, fast_params), grads(ref_out, ref_params)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fast_dropout_masks_are_bernoulli_follow_the_seed_and_scale():
    torch.manual_seed(0)
    x = torch.randn(400, 500)
    drop = FastDropout(0.1).train()
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    assert drop.eval()(x) is x and FastDropout(0.0).train()(x) is x
    torch.manual_seed(3)
    first, second = bernoulli_keep_mask((7, 9, 5), 0.3, torch.float32), bernoulli_keep_mask((7, 9, 5), 0.3, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(bernoulli_keep_mask((7, 9, 5), 0.3, torch.float32), first)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert abs((bernoulli_keep_mask((1001, 999), 0.3, torch.float32) > 0).float().mean().item() - 0.7) < 0.003


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_fast_attention_equals_torch_multihead_attention(shared_qk, training):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, dropout=0.0).train(training)
    fast = swapped(ref, FastMultiheadAttention)
    x, v = torch.randn(7, 2, 16, requires_grad=True), torch.randn(7, 2, 16)
    q = x
    k = x if shared_qk else torch.randn(7, 2, 16)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    out_fast = fast(q, k, v, key_padding_mask=mask, need_weights=False)[0]
    out_ref = ref(q, k, v, key_padding_mask=mask, need_weights=False)[0]
    assert_same_function(out_fast, out_ref, [*fast.parameters(), x], [*ref.parameters(), x])


@pytest.mark.parametrize("attention_dropout", [0.0, 0.3])
def test_first_query_attention_is_exact_with_gradients(attention_dropout):
    torch.manual_seed(0)
    attn = FastMultiheadAttention(16, 4, dropout=attention_dropout).train()
    query, key, value = torch.randn(12, 3, 16), torch.randn(12, 3, 16), torch.randn(12, 3, 16)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[1, 7:] = True
    torch.manual_seed(1)  # the same attention-dropout mask, of shape (B, H, 1, S), for both
    fast = attn.first_query(query, key, value, mask)
    torch.manual_seed(1)
    general = attn(query[:1], key, value, key_padding_mask=mask, need_weights=False)[0]
    assert_same_function(fast, general, attn.parameters(), attn.parameters())


@pytest.mark.parametrize("pre_norm", [False, True])
def test_first_token_encoder_layer_equals_the_full_layers_first_position(pre_norm):
    torch.manual_seed(0)
    ref = EncoderLayer(16, 4, 32, dropout=0.0, pre_norm=pre_norm)
    fast = fast_dropout_everywhere(swapped(ref, FirstTokenEncoderLayer))
    x, pos = torch.randn(9, 2, 16), torch.randn(9, 1, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    assert_same_function(fast(x, pos, mask), ref(x, pos, mask)[:1], fast.parameters(), ref.parameters())


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_zero_target_decoder_layer_equals_the_layer_on_a_zero_target(pre_norm, training):
    torch.manual_seed(0)
    ref = fast_dropout_everywhere(DecoderLayer(16, 4, 32, dropout=0.3, pre_norm=pre_norm)).train(training)
    fast = swapped(ref, ZeroTargetDecoderLayer)
    memory, memory_pos, query_pos = torch.randn(5, 3, 16), torch.randn(5, 1, 16), torch.randn(6, 1, 16)
    with torch.no_grad():  # non-zero biases: DETR's zero init would make the self-attention block trivially 0
        for p in ref.self_attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(ref.state_dict())
    target = torch.zeros(6, 3, 16)
    outputs = []
    for layer in (fast, ref):
        torch.manual_seed(1)  # the same dropout masks: the fast self-attention draws the same (B, H, Q, Q) mask first
        outputs.append(layer(target, memory, query_pos, memory_pos))
    assert_same_function(outputs[0], outputs[1], fast.parameters(), ref.parameters())


def test_accelerate_swaps_in_place_and_keeps_the_state_dict():
    from il_policies import make_policy

    meta = {"obs": {"agent_pos": {"shape": (4,), "kind": "low_dim"}, "image": {"shape": (3, 32, 32), "kind": "rgb"}},
            "action": {"shape": (3,)}}
    policy = make_policy({"name": "act", "d_model": 32, "n_heads": 4, "dim_feedforward": 64, "n_encoder_layers": 1,
                          "n_vae_encoder_layers": 2, "latent_dim": 8, "horizon": 5, "n_action_steps": 5}, meta)
    keys = {k: v.shape for k, v in policy.state_dict().items()}
    assert accelerate(policy) is policy
    assert {k: v.shape for k, v in policy.state_dict().items()} == keys
    assert type(policy.vae_encoder.layers[-1]) is FirstTokenEncoderLayer and type(policy.vae_encoder.layers[0]) is EncoderLayer
    assert type(policy.decoder.layers[0]) is ZeroTargetDecoderLayer
    assert all(type(m) is not nn.Dropout and type(m) is not nn.MultiheadAttention for m in policy.modules())
    assert policy.backbone.body[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_onednn_linear_equals_f_linear_with_gradients():
    from il_policies.accel.swaps import ONEDNN_MIN_MACS, OneDNNLinear

    torch.manual_seed(0)
    ref = nn.Linear(512, 1024)
    fast = swapped(ref, OneDNNLinear)
    x = torch.randn(4, 160, 512, requires_grad=True)  # 640 rows: above ONEDNN_MIN_MACS, the oneDNN product
    assert 640 * 512 * 1024 >= ONEDNN_MIN_MACS
    assert_same_function(fast(x), ref(x), [*fast.parameters(), x], [*ref.parameters(), x], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x[:1, :3]), ref(x[:1, :3]))


@pytest.mark.parametrize("size,out", [((11, 11), 4), ((12, 7), (3, 5)), ((4, 4), 4), ((5, 9), 1)])
def test_matmul_adaptive_average_pooling_equals_torchs(size, out):
    from il_policies.accel.swaps import MatmulAdaptiveAvgPool2d

    torch.manual_seed(0)
    ref = nn.AdaptiveAvgPool2d(out)
    x = torch.randn(2, 6, *size, requires_grad=True)
    assert_same_function(swapped(ref, MatmulAdaptiveAvgPool2d)(x), ref(x), [x], [x])


@pytest.mark.parametrize("in_channels,out_channels,kernel,stride,padding,length", [
    (14, 32, 5, 1, 2, 16),   # the U-Net's first convolution
    (64, 64, 3, 2, 1, 16),   # its stride-2 downsampling
    (32, 48, 1, 1, 0, 8),    # a 1x1 residual projection
    (8, 8, 4, 3, 0, 11),     # no padding, a stride that leaves a remainder
])
def test_matmul_conv1d_equals_torchs_conv1d(in_channels, out_channels, kernel, stride, padding, length):
    from il_policies.accel.swaps import MatmulConv1d

    torch.manual_seed(0)
    ref = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=padding)
    fast = swapped(ref, MatmulConv1d)
    x = torch.randn(3, in_channels, length, requires_grad=True)
    assert_same_function(fast(x), ref(x), [*fast.parameters(), x], [*ref.parameters(), x])
    with torch.no_grad():  # batch 1, the robot's
        torch.testing.assert_close(fast(x[:1]), ref(x[:1]), rtol=1e-5, atol=1e-6)
