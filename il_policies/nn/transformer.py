"""Transformer blocks (DETR / ACT style) and sinusoidal position embeddings.

- Tensors are batch-first `(B, S, D)`; attention runs through `F.scaled_dot_product_attention`
  (with attention dropout in training, through the same math written out, for the faster dropout).
- Position embeddings are added to the queries and keys only, never to the values (DETR).
- `post-norm` by default (`pre_norm=False`), as ACT; `pre_norm=True` gives pre-norm layers and a
  final LayerNorm after the encoder.
- Self-attention computes its query and key projections with one matmul (the same `x + pos` feeds
  both), the value projection from `x`; the packed `in_proj_weight` is laid out as
  `nn.MultiheadAttention`'s (q, k, v rows).
- On a CPU the linear layers' forward products run through oneDNN's fp32 matmul (`linear`; ReLU fused
  at inference): 1.2-2x faster than the default BLAS call for the few-row products of batch-1
  inference; for the training shapes 1.1-1.3x in one session, level with MKL in another. At
  inference the weights are prepacked once into oneDNN's layout (`prepack`, cached until a weight
  changes): 1.5x faster again for 11 rows. Same math, same precision.
- Dropout masks come from numpy's PCG64 seeded from torch's generator (`bernoulli_keep_mask`): the same
  Bernoulli masks, reproducible under `torch.manual_seed`, ~3x cheaper than torch's CPU uniform_.
- Work whose result is unused or fixed is skipped, exactly: `TransformerEncoder(n_outputs=1)` computes
  only the first position in its last layer; the decoder's first self-attention over its zero target
  is formed from the batch-independent attention matrix and the value bias, and at inference it and
  the cross-attention queries (weights-only values) are cached until a weight changes.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from il_policies.nn.cache import WeightCache
from il_policies.nn.threads import wide

# Multiply-adds from which an inference product gains from a second thread (see nn/threads.py): an
# 11 x 512 x 512 product runs faster on one (135 vs 179 us), 11 x 512 x 1024 breaks even.
_WIDE_PRODUCT = 11 * 512 * 1024


@functools.cache
def _onednn_linear() -> bool:
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), torch.ones(3, 4), torch.ones(3), "relu", [], "")
        return bool(torch.equal(out, torch.full((2, 3), 5.0)))
    except (AttributeError, RuntimeError):
        return False


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN's forward matmul; the backward is the usual two BLAS products."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """`F.linear` (then ReLU when `relu`). On a CPU in fp32 the forward product is oneDNN's matmul
    (ReLU fused at inference, where `weight` may be a `prepack`ed copy); the backward is the same
    BLAS products as F.linear's."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32 or not _onednn_linear():
        out = F.linear(x, weight, bias)  # (inductor packs and fuses compiled products itself)
        return F.relu(out) if relu else out
    if not torch.is_grad_enabled():
        x = x.contiguous()
        with wide(x.numel() * weight.shape[0] >= _WIDE_PRODUCT):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    flat = x.reshape(-1, x.shape[-1])
    out = _OneDNNLinear.apply(flat if flat.is_contiguous() else flat.contiguous(), weight, bias)
    out = out.view(*x.shape[:-1], weight.shape[0])
    return F.relu(out) if relu else out


def prepacking(weight: torch.Tensor) -> bool:
    """Whether inference runs `weight`'s products with a oneDNN-prepacked copy (CPU, fp32, no autograd,
    not under torch.compile)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and _onednn_linear())


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) in oneDNN's blocked layout, for `linear`: packed once instead of at every call
    (1.5x faster products for batch-1 inference's few rows, 1.1x for 100 rows)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, F.dropout's distribution with a faster mask on a CPU (`bernoulli_keep_mask`)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, True)
    return x * bernoulli_keep_mask(x.shape, p, x.dtype)


def bernoulli_keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p) with probability 1 - p, else 0, i.i.d. per element.

    The bits come from numpy's PCG64 seeded by one draw from torch's generator, so the masks follow
    `torch.manual_seed` and checkpointed RNG states exactly as torch's own draws do. Torch's CPU
    generator (mt19937, one thread) takes ~7 ns per uniform; PCG64 gives two 32-bit words per ~2 ns
    (an 816 x 3200 mask: 9 instead of 30 ms; ACT's training step ~8 % faster). A word u is kept when
    u >= p * 2^32 (compared as int32, shifted by 2^31): the keep probability is exact to 2^-32
    (torch's float uniform: 2^-24).
    """
    numel = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.PCG64(seed).random_raw((numel + 1) // 2).view(np.int32)[:numel]
    threshold = round(p * 2**32) - 2**31
    keep = torch.from_numpy(words).view(shape) >= threshold
    return torch.where(keep, 1.0 / (1.0 - p), 0.0).to(dtype)


def sinusoidal_1d(num_positions: int, dim: int) -> torch.Tensor:
    """(N, D) "Attention is all you need" table: sin on even dims, cos on odd, period 10000^(2i/D)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inverse = 10000.0 ** (2 * (torch.arange(dim) // 2) / dim).to(torch.float64)
    angle = position / inverse
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def sinusoidal_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(H * W, D) DETR 2D table: the first D/2 channels encode the row, the last D/2 the column.

    Positions run 1..H (1..W) scaled to (0, 2*pi], sin and cos interleaved, as DETR and ACT.
    """
    half = dim // 2
    y = torch.arange(1, height + 1, dtype=torch.float32) / (height + 1e-6) * 2 * math.pi
    x = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1e-6) * 2 * math.pi
    inverse = temperature ** (2 * (torch.arange(half, dtype=torch.float32) // 2) / half)

    def encode(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, half), sin/cos interleaved
        angle = values[:, None] / inverse
        return torch.stack((angle[:, 0::2].sin(), angle[:, 1::2].cos()), dim=-1).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, half)
    pos_x = encode(x)[None, :, :].expand(height, width, half)
    return torch.cat((pos_y, pos_x), dim=-1).reshape(height * width, dim)


class MultiheadAttention(nn.Module):
    """Multi-head attention with packed (q, k, v) input projections, batch-first, fused SDPA kernel."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model {dim} is not divisible by n_heads {n_heads}")
        self.dim, self.n_heads, self.dropout = dim, n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        # Biases as nn.Linear initializes them (nn.MultiheadAttention zeroes them): with zero biases, ACT's
        # first decoder self-attention over its zero target outputs exactly 0, and its weights would get
        # no gradient until the biases have moved.
        nn.init.uniform_(self.in_proj_bias, -dim**-0.5, dim**-0.5)
        self._packed = WeightCache()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, H, S, D/H)
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        qk_shared: bool = False,
        n_queries: int | None = None,
        projected_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`query` (B, Sq, D), `key`/`value` (B, Sk, D), `key_padding_mask` (B, Sk) True = ignore.

        `qk_shared`: query is key (self-attention), so both projections take one matmul.
        `n_queries`: only the first n query positions are computed (their outputs are all that is used).
        `projected_query`: the query projection, already computed (`query` is then ignored).
        """
        if n_queries is not None and projected_query is None and 4 * n_queries <= key.shape[1]:
            return self._few_query_attention(query[:, :n_queries], key, value, key_padding_mask)
        d, w, b = self.dim, self._weights(), self.in_proj_bias
        if projected_query is not None:
            q, k = projected_query, linear(key, w["k"], b[d : 2 * d])
        elif qk_shared and n_queries is None:
            q, k = linear(query, w["qk"], b[: 2 * d]).chunk(2, dim=-1)
        else:
            if n_queries is not None:
                query = query[:, :n_queries]
            q = linear(query, w["q"], b[:d])
            k = linear(key, w["k"], b[d : 2 * d])
        v = linear(value, w["v"], b[2 * d :])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.training and self.dropout > 0:
            # What SDPA's math path does with dropout, with the faster dropout mask.
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            out = dropout(torch.softmax(scores, dim=-1), self.dropout, True) @ v
        else:
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return linear(out.transpose(1, 2).flatten(2), w["out"], self.out_proj.bias)

    def _few_query_attention(self, query, key, value, key_padding_mask):
        """A few queries over many keys, reassociated so that the keys and values are never projected:
        with q_h the query of head h,
            q_h . (W_k,h y_j + b_k,h) = (W_k,h^T q_h) . y_j + const_h     (a constant cancels in the softmax)
            sum_j a_hj (W_v,h v_j + b_v,h) = W_v,h (sum_j a_hj v_j) + (sum_j a_hj) b_v,h
        (row sums are 1 without attention dropout, not with it). The same function and gradients;
        two (S x D x D) products become four of ~H x S x D (ACT's CLS-only last CVAE layer: -2.5 GFLOP
        per training step at batch 8)."""
        d, h, w, b = self.dim, self.n_heads, self.in_proj_weight, self.in_proj_bias
        q = self._heads(linear(query, w[:d], b[:d]))  # (B, H, n, D/H)
        w_k, w_v = w[d : 2 * d].unflatten(0, (h, -1)), w[2 * d :].unflatten(0, (h, -1))  # (H, D/H, D)
        keys_dir = torch.einsum("bhnc,hcd->bhnd", q * (q.shape[-1] ** -0.5), w_k)  # W_k,h^T q_h: (B, H, n, D)
        scores = torch.einsum("bhnd,bsd->bhns", keys_dir, key)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        mixed = torch.einsum("bhns,bsd->bhnd", attn, value)  # sum_j a_hj v_j
        out = torch.einsum("bhnd,hcd->bhnc", mixed, w_v) + attn.sum(-1, keepdim=True) * b[2 * d :].unflatten(0, (h, 1, -1))
        return linear(out.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)

    def _weights(self) -> dict[str, torch.Tensor]:
        """The projection weights by part; at CPU inference `prepack`ed copies, rebuilt when a weight changes."""
        d, w = self.dim, self.in_proj_weight
        parts = {"q": w[:d], "k": w[d : 2 * d], "v": w[2 * d :], "qk": w[: 2 * d], "out": self.out_proj.weight}
        if not prepacking(w):
            return parts
        return self._packed.get([w, self.out_proj.weight], lambda: {name: prepack(t) for name, t in parts.items()})

    def project_query(self, query: torch.Tensor) -> torch.Tensor:
        return linear(query, self.in_proj_weight[: self.dim], self.in_proj_bias[: self.dim])

    def zero_value_self_attention(self, pos: torch.Tensor, batch: int) -> torch.Tensor:
        """Self-attention over a zero input whose queries and keys are `pos` (Q, D): (B, Q, D).

        The values are all the value bias b_v, so output_i = out_proj(sum_j A_ij b_v): without
        dropout this is out_proj(b_v) for every query (the attention rows sum to one); with dropout
        the rows of the dropped attention matrix are summed. Same function and gradients as the
        general path, without projecting B * Q zero tokens.
        """
        d, h = self.dim, self.n_heads
        b_v = self.in_proj_bias[2 * d :]
        if not (self.training and self.dropout > 0):
            out = self.out_proj(b_v)
            return out.expand(batch, pos.shape[0], d)
        q, k = F.linear(pos, self.in_proj_weight[: 2 * d], self.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        q, k = q.unflatten(-1, (h, -1)).transpose(0, 1), k.unflatten(-1, (h, -1)).transpose(0, 1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)  # (H, Q, Q), batch-independent
        row_sums = dropout(attn.expand(batch, -1, -1, -1), self.dropout, True).sum(-1)  # (B, H, Q)
        per_head = b_v.unflatten(0, (h, -1))  # (H, D/H)
        mixed = (row_sums[..., None] * per_head[None, :, None, :]).transpose(1, 2).flatten(2)  # (B, Q, D)
        return self.out_proj(mixed)


class _Layer(nn.Module):
    """Feed-forward block and dropout shared by the encoder and decoder layers."""

    def __init__(self, dim: int, dim_feedforward: int, dropout: float, activation: str, pre_norm: bool):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"unknown activation {activation!r}: use relu or gelu")
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.dropout, self.activation, self.pre_norm = dropout, activation, pre_norm
        self._packed = WeightCache()

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.dropout, self.training)

    def _feedforward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.linear1.weight, self.linear2.weight
        if prepacking(w1):
            w1, w2 = self._packed.get([w1, w2], lambda: (prepack(w1), prepack(w2)))
        if self.activation == "relu":
            h = linear(x, w1, self.linear1.bias, relu=True)
        else:
            h = F.gelu(linear(x, w1, self.linear1.bias))
        return self._drop(linear(self._drop(h), w2, self.linear2.bias))


class EncoderLayer(_Layer):
    def __init__(self, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__(dim, dim_feedforward, dropout, activation, pre_norm)
        self.self_attn = MultiheadAttention(dim, n_heads, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, pos=None, key_padding_mask=None, n_queries: int | None = None):
        """(B, S, D) -> (B, S, D), or (B, n_queries, D): only the first positions' outputs."""
        skip = x if n_queries is None else x[:, :n_queries]
        h = self.norm1(x) if self.pre_norm else x
        qk = h if pos is None else h + pos
        h = self.self_attn(qk, qk, h, key_padding_mask, qk_shared=True, n_queries=n_queries)
        x = skip + self._drop(h)
        if self.pre_norm:
            return x + self._feedforward(self.norm2(x))
        x = self.norm1(x)
        return self.norm2(x + self._feedforward(x))


class TransformerEncoder(nn.Module):
    def __init__(self, n_layers: int, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, n_heads, dim_feedforward, dropout, activation, pre_norm) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()

    def forward(self, x, pos=None, key_padding_mask=None, n_outputs: int | None = None):
        """`n_outputs`: return only the first positions (the last layer then computes only those)."""
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x = layer(x, pos, key_padding_mask, n_queries=n_outputs if last else None)
        return self.norm(x)


class DecoderLayer(_Layer):
    def __init__(self, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__(dim, dim_feedforward, dropout, activation, pre_norm)
        self.self_attn = MultiheadAttention(dim, n_heads, dropout)
        self.cross_attn = MultiheadAttention(dim, n_heads, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self._prefix = WeightCache()

    def _constant_prefix(self, query_pos: torch.Tensor):
        """Zero target at inference: the self-attention block's output (1, D) and the cross-attention
        queries (Q, D) depend on the weights only; cached until one of them changes."""
        sources = [self.self_attn.in_proj_bias, self.self_attn.out_proj.weight, self.self_attn.out_proj.bias,
                   self.norm1.weight, self.norm1.bias, self.cross_attn.in_proj_weight, self.cross_attn.in_proj_bias, query_pos]

        def prefix():
            x = self.norm1(self.self_attn.out_proj(self.self_attn.in_proj_bias[2 * self.self_attn.dim :]))[None]
            return x, self.cross_attn.project_query(x + query_pos)

        return self._prefix.get(sources, prefix)

    def forward(self, x, memory, query_pos, memory_pos=None, batch: int | None = None):
        """`x` (B, Q, D) or None for a zero target (ACT's first layer); `query_pos` (Q, D) or (B, Q, D);
        `memory` (B, S, D) with `memory_pos` added to its keys."""
        keys = memory if memory_pos is None else memory + memory_pos
        if x is None and not self.pre_norm and not self.training and not torch.is_grad_enabled() and query_pos.dim() == 2:
            x, queries = self._constant_prefix(query_pos)
            batch = memory.shape[0]
            x = self.norm2(x + self.cross_attn(None, keys, memory, projected_query=queries.expand(batch, -1, -1)))
            return self.norm3(x + self._feedforward(x))
        if x is None and not self.pre_norm:
            # 0 + dropout(self_attn(0)) — computed without projecting the zero tokens.
            x = self._drop(self.self_attn.zero_value_self_attention(query_pos, batch))
        else:
            if x is None:
                x = query_pos.new_zeros(batch, query_pos.shape[-2], query_pos.shape[-1])
            h = self.norm1(x) if self.pre_norm else x
            qk = h + query_pos
            x = x + self._drop(self.self_attn(qk, qk, h, qk_shared=True))
        if not self.pre_norm:
            x = self.norm1(x)
        h = self.norm2(x) if self.pre_norm else x
        x = x + self._drop(self.cross_attn(h + query_pos, keys, memory))
        if not self.pre_norm:
            x = self.norm2(x)
        h = self.norm3(x) if self.pre_norm else x
        x = x + self._feedforward(h)
        return x if self.pre_norm else self.norm3(x)


class TransformerDecoder(nn.Module):
    """Decoder layers over a zero target with learned query positions, then a final LayerNorm."""

    def __init__(self, n_layers: int, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, n_heads, dim_feedforward, dropout, activation, pre_norm) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory, query_pos, memory_pos=None):
        x = None  # the target starts as zeros
        for layer in self.layers:
            x = layer(x, memory, query_pos, memory_pos, batch=memory.shape[0])
        return self.norm(x)


__all__ = [
    "DecoderLayer", "EncoderLayer", "MultiheadAttention", "TransformerDecoder", "TransformerEncoder",
    "dropout", "linear", "sinusoidal_1d", "sinusoidal_2d",
]
