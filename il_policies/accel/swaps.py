"""Module swaps that compute a reference network's function with less work on a CPU.

Each swap changes a module's class in place (its parameters, buffers and state_dict keys stay as
they are, so an optimizer or a checkpoint does not notice), the way quantization swaps `nn.Linear`
for another module. `tests/test_accel.py` checks every swap against the reference module, values
and gradients.

- `FastDropout` (for `nn.Dropout`): the same Bernoulli masks drawn with numpy's PCG64, seeded by
  one draw from torch's generator, instead of torch's one-thread mt19937 CPU sampler.
- `OneDNNLinear` (for `nn.Linear`, in training): the forward product of large linears through
  oneDNN's matmul (a private `torch.ops.mkldnn` op) instead of the default BLAS call; the backward
  is the same two BLAS products as `F.linear`'s.
- `FastMultiheadAttention` (for `nn.MultiheadAttention`): one matmul for the query and key
  projections when both read the same tensor, `OneDNNLinear`'s products, attention dropout with
  `FastDropout`'s masks, and `first_query`, attention for the first query alone without projecting
  the keys and values.
- `MatmulAdaptiveAvgPool2d` (for `nn.AdaptiveAvgPool2d`): the window averages as two products with
  averaging matrices, which an ONNX runtime runs as two matmuls instead of index gathers and masks.
- `MatmulConv1d` (for `nn.Conv1d`): the convolution as one matrix product of the unfolded windows
  (im2col) with the flattened kernel, instead of torch's generic CPU convolution for 1D signals
  (Diffusion Policy's U-Net runs dozens of them per denoising step on short action sequences).
- `FirstTokenEncoderLayer`: an encoder's last layer when only the first position's output is read
  (ACT's CVAE encoder reads its CLS token).
- `ZeroTargetDecoderLayer`: a decoder's first layer when its target is always zero (ACT): the
  self-attention's values are then one constant vector, so the block needs no projection of the
  target.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from il_policies.nn.transformer import DecoderLayer, EncoderLayer, with_pos


def bernoulli_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p) with probability 1 - p, else 0, i.i.d. per element.

    The bits come from numpy's PCG64 seeded by one draw from torch's generator, so the masks follow
    `torch.manual_seed` and checkpointed RNG states as torch's own draws do. A 32-bit word u is kept
    when u >= p * 2^32 (compared as int32, shifted by 2^31): the keep probability is exact to 2^-32.
    """
    numel = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.PCG64(seed).random_raw((numel + 1) // 2).view(np.int32)[:numel]
    threshold = round(p * 2**32) - 2**31
    keep = torch.from_numpy(words).view(shape) >= threshold
    return torch.where(keep, 1.0 / (1.0 - p), 0.0).to(dtype)


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, True)
    return x * bernoulli_keep_mask(x.shape, p, x.dtype)


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


# Products of at least this many multiply-adds take oneDNN's forward matmul (smaller ones gain nothing:
# bench/ACT.md).
ONEDNN_MIN_MACS = 2**28


@functools.cache
def _onednn_available() -> bool:
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), torch.ones(3, 4), torch.ones(3), "none", [], "")
        return bool(torch.equal(out, torch.full((2, 3), 5.0)))
    except (AttributeError, RuntimeError):
        return False


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x W^T + b (x 2-D) with oneDNN's forward matmul; the backward is F.linear's two BLAS products."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; large CPU fp32 products with autograd on take oneDNN's forward matmul."""
    rows = x.numel() // x.shape[-1]
    if (not torch.is_grad_enabled() or rows * weight.numel() < ONEDNN_MIN_MACS or x.device.type != "cpu"
            or x.dtype != torch.float32 or bias is None or torch.compiler.is_compiling() or not _onednn_available()):
        return F.linear(x, weight, bias)
    out = _OneDNNLinearFunction.apply(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class FastMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` (sequence-first, packed input projection, no extra key/value biases)
    for `need_weights=False` calls; anything else goes to the reference implementation."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or attn_mask is not None or is_causal or not self._fast_path_applies():
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        d, w, b = self.embed_dim, self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = linear(query, w[: 2 * d], b[: 2 * d]).chunk(2, dim=-1)
        else:
            q, k = linear(query, w[:d], b[:d]), linear(key, w[d : 2 * d], b[d : 2 * d])
        q, k, v = (self._heads(t) for t in (q, k, linear(value, w[2 * d :], b[2 * d :])))
        if self.training and self.dropout > 0:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            out = fast_dropout(torch.softmax(scores, dim=-1), self.dropout, True) @ v
        else:
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(rearrange(out, "b h s c -> s b (h c)")), None

    def _fast_path_applies(self) -> bool:
        return self._qkv_same_embed_dim and self.in_proj_bias is not None and self.bias_k is None and not self.batch_first

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (S, B, D) -> (B, H, S, D/H)
        return rearrange(x, "s b (h c) -> b h s c", h=self.num_heads)

    def first_query(self, query, key, value, key_padding_mask=None) -> torch.Tensor:
        """Attention for `query[:1]` alone: (1, B, D). With q_h the first query of head h,
            q_h . (W_k,h y_j + b_k,h) = (W_k,h^T q_h) . y_j + const_h      (the constant cancels in the softmax)
            sum_j a_hj (W_v,h v_j + b_v,h) = W_v,h (sum_j a_hj v_j) + (sum_j a_hj) b_v,h
        (the row sums are 1 without attention dropout, not with it): two (S x D x D) projections become
        products of ~H x S x D."""
        d, h, w, b = self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias
        q = self._heads(F.linear(query[:1], w[:d], b[:d]))  # (B, H, 1, D/H)
        w_k, w_v = w[d : 2 * d].unflatten(0, (h, -1)), w[2 * d :].unflatten(0, (h, -1))  # (H, D/H, D)
        key_direction = torch.einsum("bhnc,hcd->bhnd", q * q.shape[-1] ** -0.5, w_k)  # W_k,h^T q_h
        scores = torch.einsum("bhnd,sbd->bhns", key_direction, key)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = fast_dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        mixed = torch.einsum("bhns,sbd->bhnd", attn, value)  # sum_j a_hj v_j
        out = torch.einsum("bhnd,hcd->bhnc", mixed, w_v) + attn.sum(-1, keepdim=True) * b[2 * d :].unflatten(0, (h, 1, -1))
        return self.out_proj(rearrange(out, "b h n c -> n b (h c)"))

    def zero_target_self_attention(self, target: torch.Tensor, pos: torch.Tensor, batch: int) -> torch.Tensor:
        """Self-attention over a target whose every position is the vector `target` (D,), with
        queries and keys `target + pos` (Q, D): (Q, B, D). The values are all v = W_v target + b_v, so
        output_i = out_proj(sum_j A_ij v): out_proj(v) for every query without attention dropout (the
        rows sum to one); with it, the rows of the dropped attention matrix are summed."""
        d, h = self.embed_dim, self.num_heads
        v = F.linear(target, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        if not (self.training and self.dropout > 0):
            return self.out_proj(v).expand(pos.shape[0], batch, d)
        q, k = F.linear(target + pos, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        q, k = (rearrange(t, "q (h c) -> h q c", h=h) for t in (q, k))
        attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)  # (H, Q, Q), the same for every sample
        row_sums = fast_dropout(attn.expand(batch, -1, -1, -1), self.dropout, True).sum(-1)  # (B, H, Q)
        mixed = row_sums[..., None] * rearrange(v, "(h c) -> h 1 c", h=h)  # (B, H, Q, D/H)
        return self.out_proj(rearrange(mixed, "b h q c -> q b (h c)"))


def _averaging_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size): row i averages adaptive pooling's window i, [floor(i * size / out), ceil((i + 1) * size / out))."""
    matrix = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class MatmulAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = (self.output_size, self.output_size) if isinstance(self.output_size, int) else self.output_size
        if out_h is None or out_w is None:
            return super().forward(x)
        rows, cols = _averaging_matrix(x.shape[-2], out_h, x), _averaging_matrix(x.shape[-1], out_w, x)
        return rows @ x @ cols.T


class MatmulConv1d(nn.Conv1d):
    """`nn.Conv1d` as windows @ kernel: (B, C, T) -> (B, T', C * k) windows -> (B, T', C_out) -> (B, C_out, T')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        (k,), (stride,), (dilation,), (pad,) = self.kernel_size, self.stride, self.dilation, self.padding
        if dilation != 1:
            return super().forward(x)
        if k == 1 and stride == 1 and pad == 0:
            windows = rearrange(x, "b c t -> b t c")
        else:
            windows = rearrange(F.pad(x, (pad, pad)).unfold(2, k, stride), "b c t k -> b t (c k)")
        out = F.linear(windows, rearrange(self.weight, "o c k -> o (c k)"), self.bias)
        return rearrange(out, "b t o -> b o t")


class FirstTokenEncoderLayer(EncoderLayer):
    """`EncoderLayer` computing the first position only: (1, B, D)."""

    def forward(self, x, pos=None, key_padding_mask=None):
        def first_query_attention(h):
            qk = with_pos(h, pos)
            return self.self_attn.first_query(qk, qk, h, key_padding_mask)

        x = self.sublayer(x, self.norm1, self.dropout1, first_query_attention, skip=x[:1])
        return self.sublayer(x, self.norm2, self.dropout2, self.feedforward)


class ZeroTargetDecoderLayer(DecoderLayer):
    """`DecoderLayer` whose target is zero at every position: its (normalized) target is then one
    vector, `h[0, 0]`, and the self-attention needs no projection of the target."""

    def self_attention(self, h, query_pos):
        pos = h.new_zeros(h.shape[0], h.shape[-1]) if query_pos is None else query_pos.reshape(-1, h.shape[-1])
        return self.self_attn.zero_target_self_attention(h[0, 0], pos, h.shape[1])


__all__ = [
    "FastDropout", "FastMultiheadAttention", "FirstTokenEncoderLayer", "MatmulAdaptiveAvgPool2d", "MatmulConv1d", "OneDNNLinear", "ZeroTargetDecoderLayer",
    "bernoulli_keep_mask", "fast_dropout", "linear",
]
