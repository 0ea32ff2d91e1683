"""Transformer layers as DETR writes them (Carion et al. 2020), the ones ACT uses, and sinusoidal
position embeddings.

- Tensors are sequence-first `(S, B, D)`, as DETR's; attention is `nn.MultiheadAttention`.
- Position embeddings are added to the queries and keys only, never to the values (DETR).
- Post-norm by default (`pre_norm=False`), as ACT; `pre_norm=True` normalizes before each block
  and the encoder then ends with a LayerNorm. The decoder always ends with one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x if pos is None else x + pos


class _Layer(nn.Module):
    """What encoder and decoder layers share: the feed-forward block and the residual wiring."""

    def __init__(self, dim: int, dim_feedforward: int, dropout: float, activation: str, pre_norm: bool):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use {' or '.join(ACTIVATIONS)}")
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.activation = ACTIVATIONS[activation]
        self.pre_norm = pre_norm

    def feedforward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def sublayer(self, x, norm: nn.Module, dropout: nn.Module, block, skip=None) -> torch.Tensor:
        """Post-norm: norm(x + dropout(block(x))); pre-norm: x + dropout(block(norm(x)))."""
        skip = x if skip is None else skip
        if self.pre_norm:
            return skip + dropout(block(norm(x)))
        return norm(skip + dropout(block(x)))


class EncoderLayer(_Layer):
    def __init__(self, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__(dim, dim_feedforward, dropout, activation, pre_norm)
        self.self_attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None):
        """`x` (S, B, D), `pos` (S, 1, D) or (S, B, D), `key_padding_mask` (B, S) True = ignore."""
        def self_attention(h):
            q = k = with_pos(h, pos)
            return self.self_attn(q, k, h, key_padding_mask=key_padding_mask, need_weights=False)[0]

        x = self.sublayer(x, self.norm1, self.dropout1, self_attention)
        return self.sublayer(x, self.norm2, self.dropout2, self.feedforward)


class DecoderLayer(_Layer):
    def __init__(self, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__(dim, dim_feedforward, dropout, activation, pre_norm)
        self.self_attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x, memory, query_pos=None, memory_pos=None, memory_key_padding_mask=None):
        """`x` (Q, B, D) target, `memory` (S, B, D); `query_pos` is added to the target's queries and
        keys, `memory_pos` to the memory's keys."""
        def cross_attention(h):
            return self.cross_attn(with_pos(h, query_pos), with_pos(memory, memory_pos), memory,
                                   key_padding_mask=memory_key_padding_mask, need_weights=False)[0]

        x = self.sublayer(x, self.norm1, self.dropout1, lambda h: self.self_attention(h, query_pos))
        x = self.sublayer(x, self.norm2, self.dropout2, cross_attention)
        return self.sublayer(x, self.norm3, self.dropout3, self.feedforward)

    def self_attention(self, h: torch.Tensor, query_pos: torch.Tensor | None) -> torch.Tensor:
        q = k = with_pos(h, query_pos)
        return self.self_attn(q, k, h, need_weights=False)[0]


class TransformerEncoder(nn.Module):
    def __init__(self, n_layers: int, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, n_heads, dim_feedforward, dropout, activation, pre_norm) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()

    def forward(self, x, pos=None, key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return self.norm(x)


class TransformerDecoder(nn.Module):
    def __init__(self, n_layers: int, dim: int, n_heads: int, dim_feedforward: int, dropout: float = 0.1,
                 activation: str = "relu", pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, n_heads, dim_feedforward, dropout, activation, pre_norm) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, memory, query_pos=None, memory_pos=None, memory_key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, memory, query_pos, memory_pos, memory_key_padding_mask)
        return self.norm(x)


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


__all__ = [
    "DecoderLayer", "EncoderLayer", "TransformerDecoder", "TransformerEncoder",
    "sinusoidal_1d", "sinusoidal_2d", "with_pos",
]
