"""What a trajectory store holds: per-key specs, the store's error type, and the check of one episode
against a schema before it is written (il_policies/data/store.py does the writing)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["FORMAT_VERSION", "KINDS", "KeySpec", "StoreError", "check_new_schema", "conform_episode", "exc_text", "first_nonfinite_row",
           "infer_schema", "parse_schema"]

FORMAT_VERSION = 1
KINDS = ("low_dim", "rgb", "action")


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


def first_nonfinite_row(values: np.ndarray) -> int | None:
    """The first row (along axis 0) of a float array holding NaN or inf, or None."""
    if values.dtype.kind != "f" or np.isfinite(values).all():
        return None
    return int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0])


def exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def conform_episode(keys: dict[str, KeySpec], episode, label: str,
                    err: Callable[[str], StoreError]) -> tuple[dict[str, np.ndarray], int]:
    """The episode's arrays cast to the schema's dtypes, and its length; `err(sentence)` for anything
    that does not fit exactly (no broadcasting: an (N, 1) action for a (4,) schema is refused)."""
    if not isinstance(episode, dict):
        raise err(f"{label} is a {type(episode).__name__}, not a dict of arrays")
    if missing := sorted(set(keys) - set(episode)):
        raise err(f"key {missing[0]!r} is missing from {label}")
    if unknown := sorted(map(str, set(episode) - set(keys))):
        raise err(f"key {unknown[0]!r} of {label} is not in the schema")
    rows, length = {}, None
    for k, spec in keys.items():
        try:
            v = np.asarray(episode[k])
        except Exception as e:
            raise err(f"key {k!r} of {label} is not array-like ({exc_text(e)})") from None
        if v.ndim < 1 or tuple(v.shape[1:]) != spec.shape:
            raise err(f"key {k!r} of {label} has per-step shape {list(v.shape[1:])} "
                      f"(array shape {list(v.shape)}) but the schema says {list(spec.shape)}")
        target = np.dtype(spec.dtype)
        if not (v.dtype == target or (target.kind == "f" and v.dtype.kind in "fiu")):
            raise err(f"key {k!r} of {label} has dtype {v.dtype.name} but the schema says {spec.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.ascontiguousarray(v, dtype=target)
        if (step := first_nonfinite_row(v)) is not None:
            raise err(f"key {k!r} of {label} holds NaN or inf (or overflows {spec.dtype}) at step {step}")
        if length is None:
            length = len(v)
        elif len(v) != length:
            raise err(f"key {k!r} of {label} has {len(v)} steps but key {next(iter(rows))!r} has {length}")
        rows[k] = v
    if not length:
        raise err(f"key {next(iter(rows))!r} of {label} has zero steps, episodes need at least one")
    return rows, length


def parse_schema(meta, attr: str, err: Callable[[str], StoreError]) -> tuple[dict[str, KeySpec], float | None, str | None, dict]:
    """(key specs, fps, task, provenance) recorded in a store's root attribute `attr`."""
    if not isinstance(meta, dict) or not isinstance(meta.get("keys"), dict):
        raise err(f"the '{attr}' root attribute has no 'keys' mapping")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise err(f"the schema has format_version {version!r}, this code reads version {FORMAT_VERSION}")
    keys = {}
    for name, d in meta["keys"].items():
        try:
            keys[name] = KeySpec(shape=tuple(d["shape"]), dtype=d["dtype"], kind=d["kind"])
        except (KeyError, TypeError, ValueError) as e:
            raise err(f"key {name!r} has a malformed schema entry ({exc_text(e)})") from None
        if (why := keys[name].problem()) is not None:
            raise err(f"key {name!r} {why}")
    if sum(s.kind == "action" for s in keys.values()) != 1:
        raise err("the schema does not have exactly one key of kind 'action'")
    fps, task, provenance = meta.get("fps"), meta.get("task"), meta.get("provenance")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf")):
        raise err(f"the '{attr}' root attribute has fps {fps!r} instead of a positive number")
    if task is not None and not isinstance(task, str):
        raise err(f"the '{attr}' root attribute has task {task!r} instead of a string")
    if provenance is not None and not isinstance(provenance, dict):
        raise err(f"the '{attr}' root attribute has a provenance of type {type(provenance).__name__} instead of a mapping")
    return keys, None if fps is None else float(fps), task, dict(provenance or {})


def infer_schema(arrays: dict, err: Callable[[str], StoreError]) -> dict[str, KeySpec]:
    """diffusion_policy stores: 'action' is the action, (N,H,W,3) uint8 is rgb, the rest low_dim."""
    if "action" not in arrays:
        raise err("key 'action' is missing, so the schema of this attribute-less store cannot be inferred")
    keys = {}
    for name, a in arrays.items():
        dt = np.dtype(a.dtype)
        kind = ("action" if name == "action" else
                "rgb" if dt == np.uint8 and a.ndim == 4 and a.shape[-1] == 3 else "low_dim")
        keys[name] = KeySpec(shape=tuple(a.shape[1:]), dtype=dt.name, kind=kind)
        if (why := keys[name].problem()) is not None:
            raise err(f"key {name!r} {why}")
    return keys


def check_new_schema(keys, fps, task, provenance, err: Callable[[str], StoreError]) -> dict:
    """What `TrajectoryStore.create` is given, checked; returns the provenance as plain JSON."""
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
        return json.loads(json.dumps(provenance if isinstance(provenance, dict) else set()))
    except (TypeError, ValueError) as e:
        raise err(f"provenance must be a JSON-serialisable dict ({exc_text(e)})") from None
