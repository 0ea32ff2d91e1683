"""Zarr trajectory store: diffusion_policy's ReplayBuffer layout on the zarr v3 API.

Layout (documented in datasets/README.md)::

    <store>/data/<key>           all episodes concatenated along axis 0, one array per key
    <store>/meta/episode_ends    int64, exclusive cumulative end step of each episode
    <store>/meta/episode_seeds   int64, optional, the seed each episode was generated with
    root attrs["il_policies"]    {"format_version": 1, "keys": {...}, "fps", "task", "provenance"}

diffusion_policy's zarr v2 stores (no schema attrs) are readable and appendable; their schema
is inferred.  Every problem raises StoreError with one sentence naming the store path and,
where relevant, the key and the episode.  One writer at a time.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec

__all__ = ["FORMAT_VERSION", "KINDS", "KeySpec", "StoreError", "TrajectoryStore"]

FORMAT_VERSION = 1
KINDS = ("low_dim", "rgb", "action")
ATTR = "il_policies"
ENDS, SEEDS = "meta/episode_ends", "meta/episode_seeds"
CHUNK_TARGET_BYTES = 2 << 20  # ~2 MB per chunk along axis 0
MAX_LOW_DIM_CHUNK_ROWS = 4096
META_CHUNK = 4096
_WRITE_CFG = {"write_empty_chunks": True}  # every chunk exists on disk -> validate() can spot lost ones


class StoreError(ValueError):
    """A store is missing, malformed or corrupt, or was handed data that does not fit its schema."""


@dataclass(frozen=True)
class KeySpec:
    shape: tuple[int, ...]  # per-step shape
    dtype: str  # numpy dtype name, e.g. "float32", "uint8"
    kind: str  # "low_dim" | "rgb" | "action"

    def __post_init__(self):
        try:
            shape, dtype = tuple(int(s) for s in self.shape), np.dtype(self.dtype).name
        except (TypeError, ValueError):
            raise ValueError(f"invalid KeySpec shape={self.shape!r} dtype={self.dtype!r}") from None
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype)

    def problem(self) -> str | None:
        """Why this spec is unusable, or None."""
        if self.kind not in KINDS:
            return f"has kind {self.kind!r}, not one of {', '.join(KINDS)}"
        if any(s < 1 for s in self.shape):
            return f"has a non-positive dimension in its shape {list(self.shape)}"
        if np.dtype(self.dtype).kind not in "biuf":
            return f"has dtype {self.dtype}, but only bool, integer and float dtypes are supported"
        if self.kind == "rgb" and (self.dtype != "uint8" or len(self.shape) != 3):
            return f"is rgb but has dtype {self.dtype} and shape {list(self.shape)} instead of uint8 HWC"
        return None

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _chunk_rows(spec: KeySpec) -> int:
    row_bytes = max(1, math.prod(spec.shape) * np.dtype(spec.dtype).itemsize)
    rows = max(1, CHUNK_TARGET_BYTES // row_bytes)
    return rows if spec.kind == "rgb" else min(rows, MAX_LOW_DIM_CHUNK_ROWS)


def _compressor(spec: KeySpec) -> BloscCodec:
    shuffle = "bitshuffle" if spec.kind == "rgb" else "shuffle"
    return BloscCodec(cname="zstd", clevel=3, shuffle=shuffle)


def _open_group(path: pathlib.Path, mode: str):
    if not path.exists():
        raise StoreError(f"trajectory store {path}: the path does not exist.")
    if not path.is_dir():
        raise StoreError(f"trajectory store {path}: the path is a file, so not a zarr group.")
    try:
        return zarr.open_group(str(path), mode=mode, use_consolidated=False)
    except zarr.errors.ContainsArrayError:
        raise StoreError(f"trajectory store {path}: the path is a zarr array, not a zarr group.") from None
    except FileNotFoundError:  # GroupNotFoundError subclasses it
        raise StoreError(f"trajectory store {path}: the path is not a zarr group.") from None
    except Exception as e:
        raise StoreError(f"trajectory store {path}: cannot open it as a zarr group ({_exc_text(e)}).") from None


class TrajectoryStore:
    """Episodes of (obs..., action) steps in a zarr group.  Build with create() or open()."""

    def __init__(self, path, group, mode: str):
        self.path = pathlib.Path(path)
        self.mode = mode
        self._group = group
        self.zarr_format: int = group.metadata.zarr_format
        self._load_structure()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, keys: dict[str, KeySpec], *, fps: float, task: str,
               provenance: dict | None = None, overwrite: bool = False) -> "TrajectoryStore":
        path = pathlib.Path(path)

        def err(msg):
            return StoreError(f"trajectory store {path}: {msg}.")

        if not isinstance(keys, dict) or not keys:
            raise err("the schema needs at least one key")
        for name, spec in keys.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise err(f"key {name!r} is not a flat name (non-empty, no '/', no leading '.')")
            if not isinstance(spec, KeySpec):
                raise err(f"key {name!r} has a {type(spec).__name__} spec instead of a KeySpec")
            if (why := spec.problem()) is not None:
                raise err(f"key {name!r} {why}")
        actions = [k for k, s in keys.items() if s.kind == "action"]
        if len(actions) != 1:
            raise err(f"the schema needs exactly one key of kind 'action', got {actions}")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise err(f"fps must be a positive number, got {fps!r}")
        if not isinstance(task, str) or not task:
            raise err(f"task must be a non-empty string, got {task!r}")
        provenance = {} if provenance is None else provenance
        try:
            provenance = json.loads(json.dumps(provenance if isinstance(provenance, dict) else set()))
        except (TypeError, ValueError) as e:
            raise err(f"provenance must be a JSON-serialisable dict ({_exc_text(e)})") from None
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise err("the path already exists (pass overwrite=True to replace it)")
            if not (path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())):
                raise err("the path exists and is not a zarr group, so it will not be overwritten")
            shutil.rmtree(path)
        try:
            group = zarr.open_group(str(path), mode="w-", zarr_format=3)
            data, meta = group.create_group("data"), group.create_group("meta")
            for name, spec in keys.items():
                data.create_array(name, shape=(0, *spec.shape), dtype=spec.dtype,
                                  chunks=(_chunk_rows(spec), *spec.shape),
                                  compressors=_compressor(spec), fill_value=0)
            meta.create_array("episode_ends", shape=(0,), dtype="int64", chunks=(META_CHUNK,),
                              compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
            group.attrs[ATTR] = {"format_version": FORMAT_VERSION,
                                 "keys": {k: s.to_json() for k, s in keys.items()},
                                 "fps": float(fps), "task": task, "provenance": provenance}
        except Exception as e:
            raise err(f"creating it failed ({_exc_text(e)})") from None
        return cls(path, group, "a")

    def update_provenance(self, extra: dict) -> None:
        """Merge JSON-serialisable `extra` into the provenance attribute (append mode only)."""
        if self.mode != "a" or self.schema_inferred:
            raise self._err("cannot update the provenance of a store opened read-only or without a schema")
        meta = dict(self._group.attrs[ATTR])
        meta["provenance"] = self.provenance = {**self.provenance, **json.loads(json.dumps(extra))}
        self._group.attrs[ATTR] = meta

    @classmethod
    def open(cls, path, mode: str = "r") -> "TrajectoryStore":
        """Open for reading ("r") or appending ("a"); runs the cheap (metadata-only) checks."""
        path = pathlib.Path(path)
        if mode not in ("r", "a"):
            raise StoreError(f"trajectory store {path}: mode must be 'r' or 'a', got {mode!r}.")
        return cls(path, _open_group(path, "r" if mode == "r" else "r+"), mode)

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
            raise self._err(f"{what} has unreadable metadata ({_exc_text(e)})") from None

    def _read_meta(self, name: str) -> np.ndarray:
        arr = self._node(name, f"key {name!r}")
        if not isinstance(arr, zarr.Array) or arr.ndim != 1 or np.dtype(arr.dtype).kind not in "iu":
            raise self._err(f"key {name!r} is not a 1-d integer array")
        try:
            return np.asarray(arr[:], dtype=np.int64)
        except Exception as e:
            raise self._err(f"key {name!r} cannot be decoded ({_exc_text(e)})") from None

    # ------------------------------------------------------------------ structure (cheap checks)
    def _load_structure(self) -> None:
        try:
            attrs = self._group.attrs.asdict()
        except Exception as e:
            raise self._err(f"the root attributes are unreadable ({_exc_text(e)})") from None
        data = self._node("data", "the 'data' group")
        if not isinstance(data, zarr.Group):
            raise self._err("'data' is not a group")
        arrays = dict(data.arrays())
        self.schema_inferred = ATTR not in attrs  # True for diffusion_policy stores
        self._infer_schema(arrays) if self.schema_inferred else self._parse_schema(attrs[ATTR])
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

        ends = self._read_meta(ENDS)
        self._ends_arr = self._group[ENDS].with_config(_WRITE_CFG)
        steps = np.diff(ends, prepend=0)
        if (bad := np.flatnonzero(steps <= 0)).size:
            i = int(bad[0])
            why = "is zero-length" if steps[i] == 0 else "ends before the previous episode ends (episode_ends is not increasing)"
            raise self._err(f"key {ENDS!r} says episode {i} {why} (end {int(ends[i])})")
        self.episode_ends = ends
        total = int(ends[-1]) if ends.size else 0
        for name, a in sorted(arrays.items()):
            n = int(a.shape[0])
            if n < total:
                i = int(np.searchsorted(ends, n, side="right"))
                raise self._err(f"key {name!r} has {n} steps, too few to hold episode {i} which ends at step {int(ends[i])}")
            if n > total:
                last = f"the last episode (episode {ends.size - 1}) ends at step {total}" if ends.size else "there are no episodes"
                raise self._err(f"key {name!r} has {n} steps but {last} (extra or uncommitted rows)")
        self._seeds_arr = None
        seeds = np.zeros(0, np.int64)
        if "episode_seeds" in self._node("meta", "the 'meta' group"):
            seeds = self._read_meta(SEEDS)
            self._seeds_arr = self._group[SEEDS].with_config(_WRITE_CFG)
            if seeds.size not in (0, ends.size):
                raise self._err(f"key {SEEDS!r} has {seeds.size} seeds for {ends.size} episodes, so episode "
                                f"{min(seeds.size, ends.size)} has no matching seed")
        self._seeds = seeds

    def _parse_schema(self, meta) -> None:
        if not isinstance(meta, dict) or not isinstance(meta.get("keys"), dict):
            raise self._err(f"the '{ATTR}' root attribute has no 'keys' mapping")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise self._err(f"the schema has format_version {version!r}, this code reads version {FORMAT_VERSION}")
        keys = {}
        for name, d in meta["keys"].items():
            try:
                keys[name] = KeySpec(shape=tuple(d["shape"]), dtype=d["dtype"], kind=d["kind"])
            except (KeyError, TypeError, ValueError) as e:
                raise self._err(f"key {name!r} has a malformed schema entry ({_exc_text(e)})") from None
            if (why := keys[name].problem()) is not None:
                raise self._err(f"key {name!r} {why}")
        if sum(s.kind == "action" for s in keys.values()) != 1:
            raise self._err("the schema does not have exactly one key of kind 'action'")
        self.keys = keys
        fps = meta.get("fps")
        self.fps = None if fps is None else float(fps)
        self.task = meta.get("task")
        self.provenance = dict(meta.get("provenance") or {})

    def _infer_schema(self, arrays: dict) -> None:
        """diffusion_policy stores: 'action' is the action, (N,H,W,3) uint8 is rgb, the rest low_dim."""
        if "action" not in arrays:
            raise self._err("key 'action' is missing, so the schema of this attribute-less store cannot be inferred")
        keys = {}
        for name, a in arrays.items():
            dt = np.dtype(a.dtype)
            kind = ("action" if name == "action" else
                    "rgb" if dt == np.uint8 and a.ndim == 4 and a.shape[-1] == 3 else "low_dim")
            keys[name] = KeySpec(shape=tuple(a.shape[1:]), dtype=dt.name, kind=kind)
            if (why := keys[name].problem()) is not None:
                raise self._err(f"key {name!r} {why}")
        self.keys, self.fps, self.task, self.provenance = keys, None, None, {}

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
            exc, c = e, int(arr.chunks[0])
            for a in range(lo - lo % c, hi, c):  # locate the first bad chunk
                try:
                    arr[max(a, lo):min(a + c, hi)]
                except Exception as e2:
                    exc, lo, hi = e2, max(a, lo), min(a + c, hi)
                    break
            raise self._err(f"key {key!r} has a corrupt chunk at steps {lo}-{hi - 1} "
                            f"({self._episodes_of(lo, hi)}): {_exc_text(exc)}") from None
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            row = lo + int(np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))[0])
            raise self._err(f"key {key!r} holds NaN or inf at step {row} ({self._episodes_of(row, row + 1)})")
        return out

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
        c = int(self._arrays[key].chunks[0])
        for lo in range(0, self.n_steps, c):
            yield lo, self._read(key, lo, min(lo + c, self.n_steps))

    def validate(self) -> None:
        """Full check: re-read the structure, decode every chunk, find lost chunks and NaN/inf."""
        self._group = _open_group(self.path, "r" if self.mode == "r" else "r+")
        self._load_structure()
        for key in self.keys:
            arr = self._arrays[key]
            c = int(arr.chunks[0])
            # chunks of our own v3 stores are all written, so a missing one was lost (it would read as zeros)
            if not self.schema_inferred and self.zarr_format == 3 and tuple(arr.chunks[1:]) == tuple(arr.shape[1:]):
                for i in range(-(-self.n_steps // c)):
                    ckey = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
                    if not (self.path / "data" / key / ckey).exists():
                        lo, hi = i * c, min((i + 1) * c, self.n_steps)
                        raise self._err(f"key {key!r} is missing the chunk file for steps {lo}-{hi - 1} "
                                        f"({self._episodes_of(lo, hi)})")
            for _ in self.iter_chunks(key):
                pass

    # ------------------------------------------------------------------ writing
    def append_episode(self, episode: dict[str, np.ndarray], seed: int | None = None) -> None:
        """Check one episode against the schema and append it; on any failure the store is unchanged."""
        idx = self.n_episodes
        ep = f"episode {idx} (being appended)"
        if self.mode != "a":
            raise self._err(f"cannot append {ep} because the store was opened read-only (mode 'r')")
        if not isinstance(episode, dict):
            raise self._err(f"{ep} is a {type(episode).__name__}, not a dict of arrays")
        if missing := sorted(set(self.keys) - set(episode)):
            raise self._err(f"key {missing[0]!r} is missing from {ep}")
        if unknown := sorted(map(str, set(episode) - set(self.keys))):
            raise self._err(f"key {unknown[0]!r} of {ep} is not in the schema")
        rows, length = {}, None
        for k, spec in self.keys.items():
            try:
                v = np.asarray(episode[k])
            except Exception as e:
                raise self._err(f"key {k!r} of {ep} is not array-like ({_exc_text(e)})") from None
            if v.ndim < 1 or tuple(v.shape[1:]) != spec.shape:
                raise self._err(f"key {k!r} of {ep} has per-step shape {list(v.shape[1:])} "
                                f"(array shape {list(v.shape)}) but the schema says {list(spec.shape)}")
            target = np.dtype(spec.dtype)
            ok = v.dtype == target or (target.kind == "f" and v.dtype.kind in "fiu")
            if not ok:
                raise self._err(f"key {k!r} of {ep} has dtype {v.dtype.name} but the schema says {spec.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                v = np.ascontiguousarray(v, dtype=target)
            if target.kind == "f" and not np.isfinite(v).all():
                step = int(np.flatnonzero(~np.isfinite(v.reshape(len(v), -1)).all(axis=1))[0])
                raise self._err(f"key {k!r} of {ep} holds NaN or inf (or overflows {spec.dtype}) at step {step}")
            if length is None:
                length = len(v)
            elif len(v) != length:
                raise self._err(f"key {k!r} of {ep} has {len(v)} steps but key {next(iter(rows))!r} has {length}")
            rows[k] = v
        if not length:
            raise self._err(f"key {next(iter(rows))!r} of {ep} has zero steps, episodes need at least one")
        n_seeds = self._seeds.size
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not -2**63 <= seed < 2**63:
                raise self._err(f"key {SEEDS!r} cannot record seed {seed!r} of {ep}, seeds are int64")
            if n_seeds != idx:
                raise self._err(f"key {SEEDS!r} cannot record a seed for {ep} because earlier episodes have none")
        elif n_seeds:
            raise self._err(f"key {SEEDS!r} needs a seed for {ep} because earlier episodes have seeds")

        start, end = self.n_steps, self.n_steps + length
        touched = []  # (array, old shape), rolled back on failure

        def grow(arr, new_len, lo, value):
            touched.append((arr, arr.shape))
            arr.resize((new_len, *arr.shape[1:]))
            arr[lo:new_len] = value

        try:
            for k, v in rows.items():
                grow(self._arrays[k], end, start, v)
            if seed is not None:
                if self._seeds_arr is None:
                    self._seeds_arr = self._group.require_group("meta").create_array(
                        "episode_seeds", shape=(0,), dtype="int64", chunks=(META_CHUNK,)).with_config(_WRITE_CFG)
                grow(self._seeds_arr, idx + 1, idx, np.int64(seed))
            grow(self._ends_arr, idx + 1, idx, np.int64(end))  # the commit point
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
            raise self._err(f"writing {ep} failed and {state} ({_exc_text(e)})") from None
        self.episode_ends = np.append(self.episode_ends, np.int64(end))
        if seed is not None:
            self._seeds = np.append(self._seeds, np.int64(seed))
