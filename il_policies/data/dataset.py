"""Sequence dataset over ReplayBuffer-style trajectories, plus batch preparation.

Build the DataLoader with ``collate_fn=collate_batch``::

    DataLoader(ds, batch_size=B, shuffle=True, collate_fn=collate_batch)

Torch's fetcher calls ``SequenceDataset.__getitems__`` with the whole list of
batch indices (map-style dataset with auto-collation), which already returns the
batched dict of numpy arrays; ``collate_batch`` only wraps them as tensors. The
default collate would instead treat that dict as a list of samples.

Images stay uint8 HWC in memory and in batches; ``prepare_batch`` moves a batch
to the device and only then converts images to float32 CHW in [0, 1].

``from_store(..., in_memory=False)`` keeps the camera keys in the store and reads
them chunk by chunk (``il_policies.data.lazy``); the low-dim keys and the actions,
a small fraction of the bytes that the normalizer and the action bounds read whole,
are loaded either way. Both modes give identical samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from il_policies.data.images import chw, to_network_image
from il_policies.data.lazy import ChunkCache, LazyArray, LazyRows
from il_policies.data.sampler import SequenceSampler, split_episodes

__all__ = ["SequenceDataset", "collate_batch", "prepare_batch"]

_OBS_KINDS = ("low_dim", "rgb")


def _spec(spec: Any, field: str) -> Any:
    """Read ``field`` from a KeySpec-like object or a mapping (e.g. from a config)."""
    return spec[field] if isinstance(spec, Mapping) else getattr(spec, field)


class SequenceDataset(torch.utils.data.Dataset):
    """One sample per timestep of the split's episodes (see ``SequenceSampler``).

    A sample is ``{"obs": {key: (n_obs_steps, *step_shape)}, "action": float32
    (horizon, A), "action_is_pad": bool (horizon,)}``; low-dim obs are float32,
    rgb obs stay as stored (uint8 HWC). ``data`` arrays are used without copying.
    """

    def __init__(
        self,
        data: dict[str, np.ndarray],
        episode_ends,
        keys: Mapping[str, Any],
        action_key: str,
        *,
        obs_keys: Sequence[str] | None = None,
        n_obs_steps: int = 1,
        horizon: int = 1,
        action_offset: int = 0,
        split: str = "train",
        val_ratio: float = 0.1,
        seed: int = 0,
        max_train_episodes: int | None = None,
        source: str = "<memory>",
        chunk_rows: int | None = None,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"{source}: split must be 'train' or 'val', got {split!r}.")
        self.source = str(source)
        self.action_key = action_key
        if obs_keys is None:
            obs_keys = [k for k in keys if k != action_key]
        self.obs_keys = list(obs_keys)
        if action_key in self.obs_keys:
            raise ValueError(f"{source}: action key {action_key!r} is also listed as an obs key.")

        self.episode_ends = np.asarray(episode_ends, dtype=np.int64)
        n_steps = int(self.episode_ends[-1]) if len(self.episode_ends) else 0
        self.specs = {}
        self.data = {}
        for key in [*self.obs_keys, action_key]:
            self.specs[key] = self._check_key(data, keys, key, n_steps)
            self.data[key] = data[key]
        self.kinds = {k: _spec(self.specs[k], "kind") for k in self.obs_keys}

        self._init_kwargs = dict(
            obs_keys=self.obs_keys, n_obs_steps=n_obs_steps, horizon=horizon,
            action_offset=action_offset, val_ratio=val_ratio, seed=seed,
            max_train_episodes=max_train_episodes, source=self.source, chunk_rows=chunk_rows,
        )
        self.chunk_rows = chunk_rows  # steps per chunk of the store's heaviest key: the blocks of `sample_blocks`
        self._keys = keys
        self.split = split
        self.train_episode_ids, self.val_episode_ids = split_episodes(
            len(self.episode_ends), val_ratio, seed, max_train_episodes
        )
        self.episode_ids = self.train_episode_ids if split == "train" else self.val_episode_ids
        self.sampler = SequenceSampler(
            self.episode_ends, self.episode_ids, n_obs_steps, horizon, action_offset
        )

    def _check_key(self, data, keys, key, n_steps):
        src = self.source
        if key not in keys:
            raise ValueError(f"{src}: key {key!r} has no spec in `keys` (have {sorted(keys)}).")
        spec = keys[key]
        if key not in data:
            raise ValueError(f"{src}: key {key!r} is in `keys` but missing from the data "
                             f"(data has {sorted(data)}).")
        arr = data[key]
        want = tuple(int(s) for s in _spec(spec, "shape"))
        if tuple(arr.shape[1:]) != want:
            raise ValueError(f"{src}: key {key!r} has per-step shape {tuple(arr.shape[1:])} "
                             f"but its spec says {want}.")
        if arr.shape[0] != n_steps:
            raise ValueError(f"{src}: key {key!r} has {arr.shape[0]} steps but episode_ends "
                             f"says {n_steps}.")
        if key == self.action_key:
            if len(want) != 1:
                raise ValueError(f"{src}: action key {key!r} must have a 1-D per-step shape, "
                                 f"got {want}.")
            return spec
        kind = _spec(spec, "kind")
        if kind not in _OBS_KINDS:
            raise ValueError(f"{src}: obs key {key!r} has kind {kind!r}, expected one of "
                             f"{_OBS_KINDS}.")
        if kind == "rgb" and (len(want) != 3 or (want[0] in (1, 3, 4) and want[2] not in (1, 3, 4))):
            raise ValueError(f"{src}: rgb key {key!r} must be stored HWC, got per-step shape "
                             f"{want}.")
        return spec

    @classmethod
    def from_store(cls, path, *, in_memory: bool | str = True, memory_budget_mb: float = 4096, cache_mb: float = 256,
                   **kwargs) -> "SequenceDataset":
        """Open a ``TrajectoryStore`` at ``path`` with only the keys in use: all in memory
        (``in_memory=True``), the cameras read lazily through a chunk cache of ``cache_mb``
        (False), or in memory when the keys' decoded bytes fit ``memory_budget_mb`` ("auto")."""
        from il_policies.data.store import TrajectoryStore

        store = TrajectoryStore.open(path)
        source = kwargs.pop("source", str(path))
        obs_keys = kwargs.pop("obs_keys", None)
        obs_keys = list(store.obs_keys) if obs_keys is None else list(obs_keys)
        wanted = [*obs_keys, store.action_key]
        missing = [k for k in wanted if k not in store.keys]
        if missing:
            raise ValueError(f"{source}: keys {missing} are not in the store "
                             f"(it has {sorted(store.keys)}).")
        if in_memory == "auto":
            in_memory = store.nbytes(wanted) <= memory_budget_mb * 2**20
        elif not isinstance(in_memory, bool):
            raise ValueError(f"{source}: in_memory must be true, false or 'auto', got {in_memory!r}.")
        lazy = [] if in_memory else [k for k in wanted if store.keys[k].kind == "rgb"]
        data = store.load(keys=[k for k in wanted if k not in lazy])
        cache = ChunkCache(int(cache_mb * 2**20))
        data |= {k: LazyArray(store, k, cache) for k in lazy}
        heaviest = max(wanted, key=lambda k: store.nbytes([k]))
        return cls(data, store.episode_ends, {k: store.keys[k] for k in wanted}, store.action_key, obs_keys=obs_keys,
                   source=source, chunk_rows=store.chunk_rows(heaviest), **kwargs)

    @property
    def lazy_keys(self) -> list[str]:
        return [k for k, v in self.data.items() if isinstance(v, LazyArray)]

    def sample_blocks(self) -> np.ndarray:
        """Each sample's block: the chunk (of the heaviest key) that holds its current step; the
        chunk-aligned batch order groups samples by it."""
        if not self.chunk_rows:
            raise ValueError(f"{self.source}: the chunk-aligned batch order needs the store's chunk size "
                             "(build the dataset with from_store).")
        return self.sampler.obs_indices[:, -1] // self.chunk_rows

    def get_validation_dataset(self) -> "SequenceDataset":
        """Same arrays (no copy), ``split="val"``."""
        return type(self)(self.data, self.episode_ends, self._keys, self.action_key,
                          split="val", **self._init_kwargs)

    @property
    def shape_meta(self) -> dict:
        obs = {}
        for k in self.obs_keys:
            shape = tuple(int(s) for s in _spec(self.specs[k], "shape"))
            if self.kinds[k] == "rgb":
                shape = chw(shape)
            obs[k] = {"shape": shape, "kind": self.kinds[k]}
        action_shape = tuple(int(s) for s in _spec(self.specs[self.action_key], "shape"))
        return {"obs": obs, "action": {"shape": action_shape}}

    def fit_data(self) -> dict[str, np.ndarray | LazyRows]:
        """Raw arrays restricted to the train episodes' steps (for fitting a normalizer); lazily
        read keys as `LazyRows`, which the normalizer streams."""
        lengths = np.diff(self.episode_ends, prepend=0)
        step_episode = np.repeat(np.arange(len(lengths)), lengths)
        mask = np.isin(step_episode, self.train_episode_ids)
        return {k: LazyRows(self.data[k], np.flatnonzero(mask)) if isinstance(self.data[k], LazyArray)
                else np.asarray(self.data[k])[mask] for k in [*self.obs_keys, self.action_key]}

    def __len__(self) -> int:
        return len(self.sampler)

    def _gather(self, idx) -> dict:
        s = self.sampler
        obs_idx = s.obs_indices[idx]
        obs = {}
        for k in self.obs_keys:
            x = self.data[k][obs_idx]
            obs[k] = x if self.kinds[k] == "rgb" else x.astype(np.float32, copy=False)
        action = self.data[self.action_key][s.action_indices[idx]].astype(np.float32, copy=False)
        return {"obs": obs, "action": action, "action_is_pad": s.action_is_pad[idx].copy()}

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of length {len(self)}")
        return self._gather(i)

    def __getitems__(self, indices: Sequence[int]) -> dict:
        """Batched gather: the same dict as ``__getitem__`` with a leading batch dim."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for dataset of length {len(self)}")
        return self._gather(idx)

    def __repr__(self) -> str:
        return (f"SequenceDataset(source={self.source!r}, split={self.split!r}, "
                f"episodes={len(self.episode_ids)}, samples={len(self)}, "
                f"obs_keys={self.obs_keys}, action_key={self.action_key!r})")


def _to_torch(x):
    if isinstance(x, Mapping):
        return {k: _to_torch(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


def collate_batch(batch) -> dict:
    """Dict of numpy (from ``__getitems__``) -> dict of tensors, no dtype change.

    Use as ``DataLoader(..., collate_fn=collate_batch)``. A list of single
    samples (a dataset without ``__getitems__``) is stacked first.
    """
    if isinstance(batch, (list, tuple)):
        def stack(items):
            if isinstance(items[0], Mapping):
                return {k: stack([it[k] for it in items]) for k in items[0]}
            return np.stack(items)
        batch = stack(list(batch))
    return _to_torch(batch)


def prepare_batch(batch: dict, shape_meta: dict, device) -> dict:
    """Move a collated batch to ``device``; rgb -> float32 (..., C, H, W) in [0, 1].

    Images are converted after the transfer (so uint8 crosses the bus). Only
    uint8 images are divided by 255; float images (e.g. from a robot) keep their
    values. Low-dim obs and ``action`` become float32; other entries just move.
    """
    obs_meta = shape_meta.get("obs", {})
    out = {}
    for name, value in batch.items():
        if name == "obs":
            obs = {}
            for k, x in value.items():
                x = torch.as_tensor(x).to(device, non_blocking=True)
                meta = obs_meta.get(k)
                if meta is not None and meta.get("kind") == "rgb":
                    obs[k] = to_network_image(x, meta["shape"], k)
                elif meta is not None:
                    obs[k] = x.float()
                else:
                    obs[k] = x
            out[name] = obs
        elif name == "action":
            out[name] = torch.as_tensor(value).to(device, non_blocking=True).float()
        elif isinstance(value, Mapping):
            out[name] = {k: torch.as_tensor(v).to(device, non_blocking=True)
                         for k, v in value.items()}
        else:
            out[name] = torch.as_tensor(value).to(device, non_blocking=True)
    return out
