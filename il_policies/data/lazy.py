"""Reading a store's arrays chunk by chunk, for datasets larger than memory.

`LazyArray` stands in for one key's whole array (all episodes' steps along axis 0): indexing it with
integer arrays, as `SequenceDataset` gathers its windows, decodes only the chunks those rows live in,
through the store's validated read path (a corrupt chunk or a NaN raises the store's one-sentence
`StoreError` naming the key and the episode), and keeps the decoded chunks in a `ChunkCache`, a
least-recently-used cache bounded in bytes that the keys of one dataset share. A chunk once decoded
serves every window that falls in it while it stays in the cache; the chunk-aligned batch order
(`il_policies.training.distributed.GlobalBatchOrder` with blocks) is what makes that happen often.

Pickling a `LazyArray` (DataLoader workers under spawn, or a pickled dataset) carries the store's
path and key, never arrays or open handles, and a forked worker does not use its parent's handle
either (a remote store's HTTP session does not survive a fork): each process opens the store itself
on first use and fills its own cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

__all__ = ["ChunkCache", "LazyArray", "LazyRows"]


class ChunkCache:
    """Decoded chunks keyed by (key, chunk index), least recently used dropped first once their
    bytes pass `budget_bytes` (the chunk being read always stays)."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the chunk cache's budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str, index: int, load) -> np.ndarray:
        entry = (key, index)
        chunk = self._chunks.get(entry)
        if chunk is not None:
            self._chunks.move_to_end(entry)
            self.hits += 1
            return chunk
        self.misses += 1
        chunk = load()
        self._chunks[entry] = chunk
        self.bytes += chunk.nbytes
        while self.bytes > self.budget_bytes and len(self._chunks) > 1:
            _, dropped = self._chunks.popitem(last=False)
            self.bytes -= dropped.nbytes
        return chunk


class LazyArray:
    """One key of a `TrajectoryStore`, read chunk by chunk (see the module docstring). Supports
    `len`, `shape`, `dtype` and `x[int_array]` / `x[i]` / `x[a:b]` returning numpy arrays."""

    def __init__(self, store, key: str, cache: ChunkCache):
        self._store, self._path, self.key, self.cache = store, store.path, key, cache
        self._pid = os.getpid()  # the process the open store belongs to
        self.shape = (store.n_steps, *store.keys[key].shape)
        self.dtype = np.dtype(store.keys[key].dtype)
        self.chunk_rows = store.chunk_rows(key)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _chunk(self, index: int) -> np.ndarray:
        def load():
            lo = index * self.chunk_rows
            return self.store.read_rows(self.key, lo, min(lo + self.chunk_rows, self.shape[0]))

        return self.cache.get(self.key, index, load)

    @property
    def store(self):
        if self._store is None or self._pid != os.getpid():  # unpickled or forked: open the store in this process
            from il_policies.data.store import TrajectoryStore

            self._store, self._pid = TrajectoryStore.open(self._path), os.getpid()
        return self._store

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        rows = np.asarray(index)
        if rows.dtype.kind not in "iu":
            raise TypeError(f"{type(self).__name__} takes integer row indices or a slice, got {rows.dtype}")
        flat = rows.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + len(self), flat)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row indices out of range for key {self.key!r} of {len(self)} steps")
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        chunks = flat // self.chunk_rows
        for index in np.unique(chunks):
            where = np.flatnonzero(chunks == index)
            out[where] = self._chunk(int(index))[flat[where] - index * self.chunk_rows]
        return out.reshape(*rows.shape, *self.shape[1:])

    def __getstate__(self):
        return {**self.__dict__, "_store": None, "cache": ChunkCache(self.cache.budget_bytes)}

    def __repr__(self) -> str:
        return f"LazyArray({str(self._path)!r}, key={self.key!r}, shape={self.shape}, chunk_rows={self.chunk_rows})"


class LazyRows:
    """Chosen rows of a `LazyArray` (e.g. the training episodes' steps) as an array-like that is
    read slice by slice: what the normalizer streams its statistics from."""

    def __init__(self, array: LazyArray, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)
        self.shape, self.dtype = (len(self.rows), *array.shape[1:]), array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return self.array[self.rows[index]]
