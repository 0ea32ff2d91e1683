"""How a store's keys are laid out: chunk sizes along the step axis, Blosc zstd, or an image codec
per frame inside shards (see `il_policies.data.codecs`)."""

from __future__ import annotations

import math

import numpy as np
from zarr.codecs import BloscCodec

from il_policies.data.codecs import ImageCodec
from il_policies.data.schema import KeySpec

CHUNK_TARGET_BYTES = 2 << 20  # ~2 MB per chunk (or shard) along axis 0
MAX_LOW_DIM_CHUNK_ROWS = 4096
META_CHUNK = 4096


def row_bytes(spec: KeySpec) -> int:
    """Decoded bytes of one step of a key."""
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def chunk_rows(spec: KeySpec) -> int:
    rows = max(1, CHUNK_TARGET_BYTES // max(1, row_bytes(spec)))
    return rows if spec.kind == "rgb" else min(rows, MAX_LOW_DIM_CHUNK_ROWS)


def key_layout(spec: KeySpec, image_codec: ImageCodec | None) -> dict:
    """`create_array`'s chunking and compression for a key: Blosc zstd chunks of ~2 MB, or for
    cameras with an image codec one encoded frame per chunk inside shards of ~2 MB decoded."""
    rows = chunk_rows(spec)
    if spec.kind == "rgb" and image_codec is not None:
        return {"chunks": (1, *spec.shape), "shards": (rows, *spec.shape), "serializer": image_codec, "compressors": None}
    shuffle = "bitshuffle" if spec.kind == "rgb" else "shuffle"
    return {"chunks": (rows, *spec.shape), "compressors": BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)}


def file_shape(arr) -> tuple[int, ...]:
    """The shape of one stored object: a shard's, or a chunk's where the array has no shards."""
    return tuple(getattr(arr, "shards", None) or arr.chunks)


def rows_per_file(arr) -> int:
    """Steps per stored object along axis 0."""
    return int(file_shape(arr)[0])


def describe_layout(arr) -> str:
    """e.g. "jpeg:95, 1 per chunk, 298 per shard" or "blosc zstd, 99 per chunk"."""
    if getattr(arr, "shards", None):
        codec = arr.serializer
        name = f"{codec.format}:{codec.quality or 'lossless'}" if isinstance(codec, ImageCodec) else type(codec).__name__
        return f"{name}, {arr.chunks[0]} per chunk, {arr.shards[0]} per shard"
    names = [getattr(c, "cname", None) for c in arr.compressors]
    kind = " ".join(f"blosc {getattr(n, 'value', n)}" for n in names if n) or "uncompressed"
    return f"{kind}, {arr.chunks[0]} per chunk"
