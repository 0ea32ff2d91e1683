"""Zarr trajectory store: diffusion_policy's ReplayBuffer layout on the zarr v3 API.

Layout (documented in datasets/README.md)::

    <store>/data/<key>           all episodes concatenated along axis 0, one array per key
    <store>/meta/episode_ends    int64, exclusive cumulative end step of each episode
    <store>/meta/episode_seeds   int64, optional, the seed each episode was generated with
    root attrs["il_policies"]    {"format_version": 1, "keys": {...}, "fps", "task", "provenance",
                                  "committed_episodes", "committed_steps"}

Crash safety: zarr writes every file atomically (a temporary file renamed over the old one), so a
kill leaves each file either old or new. An append grows the data arrays, then the seeds and
`episode_ends`, and only then rewrites the root attributes with the new episode and step counts:
that one file write is the commit. Opening trusts only the committed episodes; rows and ends past them (an
append cut short) are ignored and trimmed by the next append. `create` builds the empty store
under a temporary name and renames it into place.

diffusion_policy's zarr v2 stores (no schema attrs) are readable and appendable; their schema
is inferred.  Every problem raises StoreError with one sentence naming the store path and,
where relevant, the key and the episode.  One writer at a time.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from il_policies.data.codecs import ImageCodec, parse_image_codec
from il_policies.data.layout import META_CHUNK, describe_layout, file_shape, key_layout, row_bytes, rows_per_file
from il_policies.data.paths import built_aside, check_output_path, is_url, open_group, store_location
from il_policies.data.schema import (FORMAT_VERSION, KINDS, KeySpec, StoreError, check_new_schema, conform_episode,
                                    exc_text, first_nonfinite_row, infer_schema, parse_schema)

__all__ = ["FORMAT_VERSION", "KINDS", "KeySpec", "StoreError", "TrajectoryStore"]

ATTR = "il_policies"
ENDS, SEEDS = "meta/episode_ends", "meta/episode_seeds"
_WRITE_CFG = {"write_empty_chunks": True}  # every chunk exists on disk -> validate() can spot lost ones


class TrajectoryStore:
    """Episodes of (obs..., action) steps in a zarr group.  Build with create() or open()."""

    def __init__(self, path, group, mode: str):
        self.path = store_location(path)  # a Path, or the URL of a remote store
        self.mode = mode
        self._group = group
        self.zarr_format: int = group.metadata.zarr_format
        self._load_structure()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, keys: dict[str, KeySpec], *, fps: float, task: str, provenance: dict | None = None,
               overwrite: bool = False, image_codec: str | ImageCodec | None = None) -> "TrajectoryStore":
        """An empty store; `image_codec` (e.g. "jpeg:95", see `il_policies.data.codecs`) stores the
        camera keys as one image per frame instead of Blosc zstd chunks. A URL is written in place
        (an object store cannot rename a folder): the root attributes, written last, make it a store."""
        path = store_location(path)

        def err(msg):
            return StoreError(f"trajectory store {path}: {msg}.")

        provenance = check_new_schema(keys, fps, task, provenance, err)
        try:
            codec = image_codec if isinstance(image_codec, ImageCodec) or image_codec is None else parse_image_codec(image_codec)
        except ValueError as e:
            raise err(f"its image codec is invalid ({e})") from None
        for name, spec in keys.items():
            if codec is not None and spec.kind == "rgb" and spec.shape[-1] not in (1, 3):
                raise err(f"key {name!r} has {spec.shape[-1]} channels, and image codecs store frames of 1 or 3")
        remote = is_url(path)
        if not remote:
            check_output_path(path, overwrite)
        try:
            # a local store appears whole or not at all
            with contextlib.nullcontext(path) if remote else built_aside(path, overwrite) as building:
                group = (open_group(path, "w" if overwrite else "w-", zarr_format=3) if remote
                         else zarr.open_group(str(building), mode="w-", zarr_format=3))
                data, meta = group.create_group("data"), group.create_group("meta")
                for name, spec in keys.items():
                    data.create_array(name, shape=(0, *spec.shape), dtype=spec.dtype, fill_value=0, **key_layout(spec, codec))
                meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(META_CHUNK,),
                                  compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
                group.attrs[ATTR] = {"format_version": FORMAT_VERSION,
                                     "keys": {k: s.to_json() for k, s in keys.items()},
                                     "fps": float(fps), "task": task, "provenance": provenance,
                                     "committed_episodes": 0, "committed_steps": 0}
        except StoreError:
            raise
        except Exception as e:
            raise err(f"creating it failed ({exc_text(e)})") from None
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path, mode: str = "r") -> "TrajectoryStore":
        """Open for reading ("r") or appending ("a"); runs the cheap (metadata-only) checks. `path`
        may be a URL (see `il_policies.data.paths`)."""
        path = store_location(path)
        if mode not in ("r", "a"):
            raise StoreError(f"trajectory store {path}: mode must be 'r' or 'a', got {mode!r}.")
        return cls(path, open_group(path, "r" if mode == "r" else "r+"), mode)

    # ------------------------------------------------------------------ helpers
    def _err(self, msg: str) -> StoreError:
        return StoreError(f"trajectory store {self.path}: {msg}.")

    def _episodes_of(self, lo: int, hi: int) -> str:
        """'episode i' / 'episodes i-j' covering steps [lo, hi)."""
        a, b = (int(np.searchsorted(self.episode_ends, s, side="right")) for s in (lo, max(lo, hi - 1)))
        return f"episode {a}" if a == b else f"episodes {a}-{b}"

    def _node(self, name: str, what: str):
        try:
            return self._group[name]
        except KeyError:
            raise self._err(f"{what} is missing") from None
        except Exception as e:
            raise self._err(f"{what} has unreadable metadata ({exc_text(e)})") from None

    def _read_meta(self, name: str) -> np.ndarray:
        arr = self._node(name, f"key {name!r}")
        if not isinstance(arr, zarr.Array) or arr.ndim != 1 or np.dtype(arr.dtype).kind not in "iu":
            raise self._err(f"key {name!r} is not a 1-d integer array")
        try:
            return np.asarray(arr[:], dtype=np.int64)
        except Exception as e:
            raise self._err(f"key {name!r} cannot be decoded ({exc_text(e)})") from None

    # ------------------------------------------------------------------ structure (cheap checks)
    def _load_structure(self) -> None:
        try:
            attrs = self._group.attrs.asdict()
        except Exception as e:
            raise self._err(f"the root attributes are unreadable ({exc_text(e)})") from None
        data = self._node("data", "the 'data' group")
        if not isinstance(data, zarr.Group):
            raise self._err("'data' is not a group")
        try:
            arrays = dict(data.arrays())
        except Exception as e:
            raise self._err(f"an array in 'data' has unreadable metadata ({exc_text(e)})") from None
        self.schema_inferred = ATTR not in attrs  # True for diffusion_policy stores
        if self.schema_inferred:
            self.keys, self.fps, self.task, self.provenance = infer_schema(arrays, self._err), None, None, {}
        else:
            self.keys, self.fps, self.task, self.provenance = parse_schema(attrs[ATTR], ATTR, self._err)
        for name, spec in self.keys.items():
            if name not in arrays:
                raise self._err(f"key {name!r} is in the schema but data/{name} is missing")
            a = arrays[name]
            if tuple(a.shape[1:]) != spec.shape or a.ndim != len(spec.shape) + 1:
                raise self._err(f"key {name!r} has per-step shape {list(a.shape[1:])} but the schema says {list(spec.shape)}")
            if np.dtype(a.dtype).name != spec.dtype:
                raise self._err(f"key {name!r} has dtype {np.dtype(a.dtype).name} but the schema says {spec.dtype}")
        if extra := sorted(set(arrays) - set(self.keys)):
            raise self._err(f"key {extra[0]!r} has an array in data/ but is not in the schema")
        self._arrays = {k: arrays[k].with_config(_WRITE_CFG) for k in self.keys}
        self.action_key = next(k for k, s in self.keys.items() if s.kind == "action")
        self.obs_keys = sorted(k for k in self.keys if k != self.action_key)

        ends_written = self._read_meta(ENDS)
        self._ends_arr = self._group[ENDS].with_config(_WRITE_CFG)
        committed = self._committed_count(attrs.get(ATTR), ends_written.size)
        ends = ends_written[:committed]
        steps = np.diff(ends, prepend=0)
        if (bad := np.flatnonzero(steps <= 0)).size:
            i = int(bad[0])
            why = "is zero-length" if steps[i] == 0 else "ends before the previous episode ends (episode_ends is not increasing)"
            raise self._err(f"key {ENDS!r} says episode {i} {why} (end {int(ends[i])})")
        self.episode_ends = ends
        total = int(ends[-1]) if ends.size else 0
        if self._committed_steps is not None and self._committed_steps != total:
            raise self._err(f"key {ENDS!r} says episode {committed - 1} ends at step {total} but the last commit "
                            f"recorded {self._committed_steps} steps")
        uncommitted = ends_written.size > committed
        for name, a in sorted(arrays.items()):
            n = int(a.shape[0])
            if n < total:
                i = int(np.searchsorted(ends, n, side="right"))
                raise self._err(f"key {name!r} has {n} steps, too few to hold episode {i} which ends at step {int(ends[i])}")
            if n > total and not self._has_commit_counter:
                last = f"the last episode (episode {ends.size - 1}) ends at step {total}" if ends.size else "there are no episodes"
                raise self._err(f"key {name!r} has {n} steps but {last} (extra or uncommitted rows)")
            uncommitted |= n > total
        self._seeds_arr = None
        seeds = np.zeros(0, np.int64)
        if "episode_seeds" in self._node("meta", "the 'meta' group"):
            seeds = self._read_meta(SEEDS)
            self._seeds_arr = self._group[SEEDS].with_config(_WRITE_CFG)
            uncommitted |= seeds.size > committed
            if self._has_commit_counter and seeds.size >= committed:
                seeds = seeds[:committed]
            if seeds.size not in (0, ends.size):
                raise self._err(f"key {SEEDS!r} has {seeds.size} seeds for {ends.size} episodes, so episode "
                                f"{min(seeds.size, ends.size)} has no matching seed")
        self._seeds = seeds
        self.has_uncommitted_tail = bool(uncommitted)  # an append was cut short; the next one trims it

    def _committed_count(self, meta, n_ends: int) -> int:
        """How many episodes the last commit made visible: the root attribute, or (stores written
        before it existed, diffusion_policy's) every entry of episode_ends."""
        self._has_commit_counter = isinstance(meta, dict) and "committed_episodes" in meta
        self._committed_steps = None
        if not self._has_commit_counter:
            return n_ends
        n, steps = meta["committed_episodes"], meta.get("committed_steps", -1)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= n_ends:
            raise self._err(f"the root attribute says {n!r} episodes are committed but key {ENDS!r} "
                            f"holds {n_ends} episode ends")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise self._err(f"the root attribute records {steps!r} committed steps instead of a count")
        self._committed_steps = steps
        return n

    # ------------------------------------------------------------------ properties
    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.size)

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if self.episode_ends.size else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0).astype(np.int64)

    @property
    def episode_seeds(self) -> np.ndarray | None:
        return self._seeds.copy() if self._seeds.size and self._seeds.size == self.n_episodes else None

    # ------------------------------------------------------------------ reading
    def _read(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of a key; decoder failures become StoreError naming the chunk's episodes."""
        arr = self._arrays[key]
        try:
            out = arr[lo:hi]
        except Exception as e:
            exc, c = e, rows_per_file(arr)
            for a in range(lo - lo % c, hi, c):  # locate the first bad chunk
                try:
                    arr[max(a, lo):min(a + c, hi)]
                except Exception as e2:
                    exc, lo, hi = e2, max(a, lo), min(a + c, hi)
                    break
            raise self._err(f"key {key!r} has a corrupt chunk at steps {lo}-{hi - 1} "
                            f"({self._episodes_of(lo, hi)}): {exc_text(exc)}") from None
        if (row := first_nonfinite_row(out)) is not None:
            row += lo
            raise self._err(f"key {key!r} holds NaN or inf at step {row} ({self._episodes_of(row, row + 1)})")
        return out

    def read_rows(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Steps [lo, hi) of one key, validated like load() (what lazy datasets read chunk by chunk)."""
        self._check_key(key)
        return self._read(key, lo, hi)

    def chunk_rows(self, key: str) -> int:
        """Steps per stored object (chunk or shard) of a key along axis 0: what a lazy read decodes at once."""
        self._check_key(key)
        return rows_per_file(self._arrays[key])

    def storage(self, key: str) -> str:
        """How a key is stored, e.g. "jpeg:95, 1 per chunk, 298 per shard" or "blosc zstd, 99 per chunk"."""
        self._check_key(key)
        return describe_layout(self._arrays[key])

    def nbytes(self, keys) -> int:
        """Decoded bytes of the given keys over all committed steps."""
        return sum(self.n_steps * row_bytes(self.keys[k]) for k in keys)

    def _check_key(self, key: str) -> None:
        if key not in self.keys:
            raise self._err(f"key {key!r} is not in the schema (keys: {', '.join(sorted(self.keys))})")

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """All keys of one episode (negative indices count from the end)."""
        n = self.n_episodes
        if not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise self._err(f"episode {index!r} does not exist (the store has {n} episodes)")
        index = int(index) % n
        lo = int(self.episode_ends[index - 1]) if index else 0
        return {k: self._read(k, lo, int(self.episode_ends[index])) for k in self.keys}

    def load(self, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Whole arrays (all steps of all episodes) in memory; corrupt chunks and NaN/inf raise."""
        keys = list(self.keys) if keys is None else list(keys)
        for k in keys:
            self._check_key(k)
        return {k: self._read(k, 0, self.n_steps) for k in keys}

    def iter_chunks(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start_step, rows) chunk by chunk over one key, validated like load()."""
        self._check_key(key)
        c = rows_per_file(self._arrays[key])
        for lo in range(0, self.n_steps, c):
            yield lo, self._read(key, lo, min(lo + c, self.n_steps))

    def validate(self) -> None:
        """Full check: re-read the structure, decode every chunk, find lost chunks and NaN/inf."""
        self._group = open_group(self.path, "r" if self.mode == "r" else "r+")
        self._load_structure()
        for key in self.keys:
            arr = self._arrays[key]
            c = rows_per_file(arr)
            # chunks (shards) of our own v3 stores are all written, so a missing one was lost (it would read as zeros)
            if not self.schema_inferred and self.zarr_format == 3 and file_shape(arr)[1:] == tuple(arr.shape[1:]):
                for i in range(-(-self.n_steps // c)):
                    ckey = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
                    if not sync(self._group.store.exists(f"data/{key}/{ckey}")):
                        lo, hi = i * c, min((i + 1) * c, self.n_steps)
                        raise self._err(f"key {key!r} is missing the chunk file for steps {lo}-{hi - 1} "
                                        f"({self._episodes_of(lo, hi)})")
            for _ in self.iter_chunks(key):
                pass

    # ------------------------------------------------------------------ writing
    def append_episode(self, episode: dict[str, np.ndarray], seed: int | None = None,
                       provenance: dict | None = None) -> None:
        """Check one episode against the schema and append it; on any failure the store is unchanged.
        `provenance` (optional) is merged into the provenance attribute by the same commit, so
        progress recorded there always matches the episodes that are visible."""
        self.append_episodes([episode], None if seed is None else [seed], provenance)

    def append_episodes(self, episodes: list[dict[str, np.ndarray]], seeds: list[int] | None = None,
                        provenance: dict | None = None) -> None:
        """`append_episode` for several episodes in one commit: one write per array instead of one
        per episode (converters of many short episodes); all of them become visible, or none."""
        idx, k = self.n_episodes, len(episodes)
        label = f"episode {idx} (being appended)"
        if self.mode != "a":
            raise self._err(f"cannot append {label} because the store was opened read-only (mode 'r')")
        if seeds is not None and len(seeds) != k:
            raise self._err(f"key {SEEDS!r} got {len(seeds)} seeds for the {k} episodes from {label} on")
        conformed = [conform_episode(self.keys, ep, f"episode {idx + j} (being appended)", self._err)
                     for j, ep in enumerate(episodes)]
        if not conformed:
            return
        for j, seed in enumerate(seeds or []):
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63:
                raise self._err(f"key {SEEDS!r} cannot record seed {seed!r} of episode {idx + j} (being appended), seeds are int64")
        if seeds is not None and self._seeds.size != idx:
            raise self._err(f"key {SEEDS!r} cannot record a seed for {label} because earlier episodes have none")
        if seeds is None and self._seeds.size:
            raise self._err(f"key {SEEDS!r} needs a seed for {label} because earlier episodes have seeds")
        if provenance is not None and self.schema_inferred:
            raise self._err(f"cannot record provenance with {label} in a store without a schema")
        if self.has_uncommitted_tail:
            self._trim_uncommitted()

        start = self.n_steps
        ends = start + np.cumsum([length for _, length in conformed], dtype=np.int64)
        touched = []  # (array, old shape), rolled back on failure

        def grow(arr, new_len, lo, value):
            touched.append((arr, arr.shape))
            arr.resize((new_len, *arr.shape[1:]))
            arr[lo:new_len] = value

        try:
            for key in self.keys:
                grow(self._arrays[key], int(ends[-1]), start, np.concatenate([rows[key] for rows, _ in conformed]))
            if seeds is not None:
                if self._seeds_arr is None:
                    self._seeds_arr = self._group.require_group("meta").create_array(
                        "episode_seeds", shape=(0,), dtype="int64", chunks=(META_CHUNK,)).with_config(_WRITE_CFG)
                grow(self._seeds_arr, idx + k, idx, np.asarray(seeds, dtype=np.int64))
            grow(self._ends_arr, idx + k, idx, ends)  # the commit point of attribute-less stores
            if not self.schema_inferred:
                self._write_root_meta(idx + k, int(ends[-1]), provenance)  # the commit
        except BaseException as e:
            rolled_back = True
            for arr, shape in reversed(touched):
                try:
                    arr.resize(shape)
                except Exception:
                    rolled_back = False
            if not isinstance(e, Exception):
                raise
            state = "the store was rolled back" if rolled_back else "rolling back failed too, run validate()"
            raise self._err(f"writing {label} failed and {state} ({exc_text(e)})") from None
        self.episode_ends = np.append(self.episode_ends, ends)
        if seeds is not None:
            self._seeds = np.append(self._seeds, np.asarray(seeds, dtype=np.int64))

    def _write_root_meta(self, committed: int, steps: int, provenance: dict | None = None) -> None:
        """Rewrite the root attributes (one atomic file write): the commit record, and provenance."""
        meta = dict(self._group.attrs[ATTR])
        if provenance is not None:
            meta["provenance"] = {**self.provenance, **json.loads(json.dumps(provenance))}
        meta["committed_episodes"], meta["committed_steps"] = int(committed), int(steps)
        self._group.attrs[ATTR] = meta
        self.provenance = dict(meta["provenance"] or {})
        self._has_commit_counter = True

    def _trim_uncommitted(self) -> None:
        """Drop what an append cut short left past the committed episodes, and zarr's temporary files."""
        for arr in self._arrays.values():
            if arr.shape[0] != self.n_steps:
                arr.resize((self.n_steps, *arr.shape[1:]))
        if self._ends_arr.shape[0] != self.n_episodes:
            self._ends_arr.resize((self.n_episodes,))
        if self._seeds_arr is not None and self._seeds_arr.shape[0] != self._seeds.size:
            self._seeds_arr.resize((self._seeds.size,))
        for partial in self.path.rglob("*.partial") if isinstance(self.path, pathlib.Path) else ():
            partial.unlink(missing_ok=True)
        self.has_uncommitted_tail = False
