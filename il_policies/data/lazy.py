"""Reading a store's arrays chunk by chunk, for datasets larger than memory.

`LazyArray` stands in for one key's whole array (all episodes' steps along axis 0): indexing it with
integer arrays, as `SequenceDataset` gathers its windows, decodes only the chunks those rows live in
(those not cached read together by a few threads, so a remote store's round trips overlap each
other and the decoding) through the store's validated read path (a corrupt chunk or a NaN raises
the store's one-sentence `StoreError` naming the key and the episode), and keeps the decoded chunks
in a `ChunkCache`, a least-recently-used cache bounded in bytes that the keys of one dataset share.
A chunk once decoded serves every window that falls in it while it stays in the cache; the
chunk-aligned batch order (`il_policies.training.distributed.GlobalBatchOrder` with blocks) is what
makes that happen often.

Pickling a `LazyArray` (DataLoader workers under spawn, or a pickled dataset) carries the store's
path and key, never arrays or open handles, and a forked worker does not use its parent's handle
either (a remote store's HTTP session does not survive a fork): each process opens the store itself
on first use and fills its own cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["ChunkCache", "LazyArray", "LazyRows"]

READ_THREADS = 8  # chunks read at once (and held at once beyond the cache) by a gather


class ChunkCache:
    """Decoded chunks keyed by (key, chunk index), least recently used dropped first once their
    bytes pass `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the chunk cache's budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get_many(self, key: str, indices, load_many) -> dict[int, np.ndarray]:
        """The chunks `indices` of `key`: cached ones from the cache, the others through one call
        `load_many(missing_indices) -> [chunk, ...]`, then cached (the result holds them all
        whatever the cache drops)."""
        found, missing = {}, []
        for index in map(int, indices):
            chunk = self._chunks.get((key, index))
            if chunk is None:
                missing.append(index)
            else:
                self._chunks.move_to_end((key, index))
                found[index] = chunk
        self.hits += len(found)
        self.misses += len(missing)
        for index, chunk in zip(missing, load_many(missing) if missing else []):
            found[index] = self._chunks[(key, index)] = chunk
            self.bytes += chunk.nbytes
            while self.bytes > self.budget_bytes and self._chunks:
                _, dropped = self._chunks.popitem(last=False)
                self.bytes -= dropped.nbytes
        return found


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

    def _read_chunks(self, indices: list[int]) -> list[np.ndarray]:
        store = self.store  # opened here, not by each thread
        ranges = [(i * self.chunk_rows, min((i + 1) * self.chunk_rows, len(self))) for i in indices]
        if len(ranges) < 2:
            return [store.read_rows(self.key, *r) for r in ranges]
        with ThreadPoolExecutor(min(len(ranges), READ_THREADS)) as pool:
            return list(pool.map(lambda r: store.read_rows(self.key, *r), ranges))

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
        of_row = flat // self.chunk_rows
        needed = np.unique(of_row)
        for start in range(0, len(needed), READ_THREADS):  # a few chunks at a time: bounded beyond the cache
            for index, chunk in self.cache.get_many(self.key, needed[start : start + READ_THREADS], self._read_chunks).items():
                where = np.flatnonzero(of_row == index)
                out[where] = chunk[flat[where] - index * self.chunk_rows]
        return out.reshape(*rows.shape, *self.shape[1:])

    def with_cache(self, cache: ChunkCache) -> LazyArray:
        """The same key, through the same open store, with another cache."""
        twin = object.__new__(LazyArray)
        twin.__dict__.update(self.__dict__, cache=cache)
        return twin

    def __getstate__(self):
        return {**self.__dict__, "_store": None, "cache": ChunkCache(self.cache.budget_bytes)}

    def __repr__(self) -> str:
        return f"LazyArray({str(self._path)!r}, key={self.key!r}, shape={self.shape}, chunk_rows={self.chunk_rows})"


class LazyRows:
    """Chosen rows of a `LazyArray` (e.g. the training episodes' steps) as an array-like that is
    read slice by slice: what the normalizer streams its statistics from. A pass in order reads each
    chunk once, so it reads through a cache of its own that holds only the chunk being read, and
    leaves the dataset's cache (and the memory it may take) to the training windows."""

    def __init__(self, array: LazyArray, rows: np.ndarray):
        self.array, self.rows = array.with_cache(ChunkCache(0)), np.asarray(rows, dtype=np.int64)
        self.shape, self.dtype = (len(self.rows), *array.shape[1:]), array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        return self.array[self.rows[index]]
