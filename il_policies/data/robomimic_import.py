"""Convert a robomimic HDF5 demo file into a trajectory store (datasets/README.md).

robomimic layout read here::

    data                 attrs: env_args (JSON: env_name, type, env_kwargs), optional total
    data/demo_N          attrs: num_samples;  obs/<key> (T, ...), actions (T, A)
    mask/<name>          optional filter keys: byte strings of demo names

Each demo becomes one episode, in robomimic's order (numeric: demo_2 before demo_10).  Every
obs/<key> becomes store key <key> ("rgb" for uint8 (T, H, W, 3), else "low_dim" float32) and
`actions` becomes "action" (float32); rewards, dones, states and next_obs are not converted.

The reading mirrors robomimic.utils.file_utils (get_env_metadata_from_dataset,
get_demos_for_filter_key) and SequenceDataset's demo sort with plain h5py, because importing
robomimic.utils.file_utils imports torch and all of robomimic.algo and prints a warning on stdout;
tests/test_robomimic_import.py checks that both agree.  Every problem raises StoreError with
one sentence naming the file and, where relevant, the demo and the key.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import h5py
import numpy as np

from il_policies.data.paths import built_aside, check_output_path
from il_policies.data.schema import first_nonfinite_row
from il_policies.data.store import KeySpec, StoreError, TrajectoryStore

__all__ = ["DEFAULT_FPS", "convert_robomimic", "sort_demos"]

DEFAULT_FPS = 20.0  # robosuite's default control frequency
_DEMO_RE = re.compile(r"^demo_(\d+)$")


def sort_demos(names) -> list[str]:
    """robomimic's order (int(name[5:])); names that are not demo_<int> go last, by name."""
    def key(n):
        m = _DEMO_RE.match(n)
        return (0, int(m.group(1)), n) if m else (1, 0, n)
    return sorted(names, key=key)


def _read_meta(f: h5py.File, err) -> tuple[dict | None, list[str], list[str]]:
    """(env_args or None, filter-key names, sorted demo names)."""
    if not isinstance(f.get("data"), h5py.Group):
        raise err("has no 'data' group, so it is not a robomimic demo file")
    env_args = None
    if "env_args" in f["data"].attrs:
        raw = f["data"].attrs["env_args"]
        try:
            env_args = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except ValueError as e:
            raise err(f"has a 'data' attribute 'env_args' that is not valid JSON ({e})") from None
        if not isinstance(env_args, dict):
            raise err("has a 'data' attribute 'env_args' that is not a JSON object")
    mask = f.get("mask")
    filter_keys = sorted(mask.keys()) if isinstance(mask, h5py.Group) else []
    demos = sort_demos(k for k, v in f["data"].items() if isinstance(v, h5py.Group))
    return env_args, filter_keys, demos


def _filter_demos(f: h5py.File, name: str, filter_keys: list[str], demos: list[str], err) -> list[str]:
    if name not in filter_keys:
        raise err(f"has no filter key {name!r} (mask group keys: {', '.join(filter_keys) or 'none'})")
    try:
        listed = [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in np.asarray(f["mask"][name][()]).ravel()]
    except Exception as e:
        raise err(f"has a filter key {name!r} that is not a list of demo names ({e})") from None
    for d in listed:
        if d not in demos:
            raise err(f"lists demo {d!r} in filter key {name!r}, but data/{d} does not exist")
    return sort_demos(set(listed))


def _plan(f: h5py.File, demos: list[str], obs_keys: list[str] | None, err) -> dict[str, KeySpec]:
    """Check every demo's structure (metadata only) and return the store schema."""
    def dataset(demo, where, key):
        node = f["data"][demo].get(where)
        if not isinstance(node, h5py.Dataset):
            what = "is missing" if node is None else "is not a dataset"
            raise err(f"demo {demo!r} key {key!r} ({where}) {what}")
        return node

    for demo in demos:
        if not isinstance(f["data"][demo].get("obs"), h5py.Group):
            raise err(f"demo {demo!r} key 'obs' is missing or not a group")
    if obs_keys is None:
        obs_keys = sort_demos({k for d in demos for k in f["data"][d]["obs"].keys()})
    elif not obs_keys:
        raise err("was asked to convert an empty list of obs keys")
    elif unknown := [k for k in obs_keys if all(k not in f["data"][d]["obs"] for d in demos)]:
        avail = ", ".join(sort_demos({k for d in demos for k in f["data"][d]["obs"].keys()}))
        raise err(f"demo {demos[0]!r} has no obs key {unknown[0]!r} and neither does any other demo "
                  f"(obs keys: {avail})")
    if "action" in obs_keys:
        raise err(f"demo {demos[0]!r} key 'obs/action' would collide with the store's action key 'action'")
    schema: dict[str, KeySpec] = {}
    for demo in demos:
        actions = dataset(demo, "actions", "actions")
        n = actions.shape[0] if actions.ndim else 0
        if n < 1:
            raise err(f"demo {demo!r} key 'actions' has no steps (shape {list(actions.shape)})")
        ns = f["data"][demo].attrs.get("num_samples")
        if ns is not None and int(ns) != n:
            raise err(f"demo {demo!r} key 'actions' has {n} steps but its num_samples attribute says {int(ns)}")
        for key in ["actions", *obs_keys]:
            ds = actions if key == "actions" else dataset(demo, f"obs/{key}", key)
            if key != "actions" and (ds.ndim == 0 or ds.shape[0] != n):
                raise err(f"demo {demo!r} key {key!r} has {ds.shape[0] if ds.ndim else 0} steps but 'actions' has {n}")
            if ds.dtype.kind not in "biuf":
                raise err(f"demo {demo!r} key {key!r} has dtype {ds.dtype}, not a bool, integer or float type")
            rgb = key != "actions" and ds.dtype == np.uint8 and ds.ndim == 4 and ds.shape[-1] == 3
            spec = KeySpec(tuple(ds.shape[1:]), "uint8" if rgb else "float32",
                           "action" if key == "actions" else "rgb" if rgb else "low_dim")
            name = "action" if key == "actions" else key
            if name in schema and schema[name] != spec:
                first = schema[name]
                raise err(f"demo {demo!r} key {key!r} has per-step shape {list(spec.shape)} ({spec.kind}) but "
                          f"demo {demos[0]!r} has {list(first.shape)} ({first.kind})")
            schema[name] = spec
    return schema


def convert_robomimic(hdf5_path, out_path, *, obs_keys: list[str] | None = None, fps: float | None = None,
                      filter_key: str | None = None, overwrite: bool = False, image_codec: str | None = None) -> TrajectoryStore:
    """Write the demos of robomimic file `hdf5_path` to a new store at `out_path`; return it opened read-only.

    obs_keys: the obs keys to keep (default: all).  fps: default env_kwargs['control_freq'], else 20.
    filter_key: convert only the demos listed in mask/<filter_key>.  image_codec: store the cameras as
    images per frame (e.g. "jpeg:95", `il_policies.data.codecs`).  The store is written next to
    `out_path` and moved into place at the end, so a failed conversion leaves `out_path` untouched.
    """
    src = pathlib.Path(os.path.expanduser(str(hdf5_path))).absolute()
    out = pathlib.Path(out_path)

    def err(msg: str) -> StoreError:
        return StoreError(f"robomimic file {src}: {msg}.")

    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf")):
        raise StoreError(f"trajectory store {out}: fps must be a positive number, got {fps!r}.")
    if not src.is_file():
        raise err("does not exist" if not src.exists() else "is not a file")
    check_output_path(out, overwrite)
    try:
        f = h5py.File(src, "r")
    except OSError as e:
        raise err(f"cannot be opened as HDF5 ({' '.join(str(e).split())[:150]})") from None
    with f:
        env_args, filter_keys, demos = _read_meta(f, err)
        if filter_key is not None:
            demos = _filter_demos(f, filter_key, filter_keys, demos, err)
        if not demos:
            raise err("has no demos to convert" + (f" in filter key {filter_key!r}" if filter_key else ""))
        schema = _plan(f, demos, obs_keys, err)
        if fps is None:
            fps = ((env_args or {}).get("env_kwargs") or {}).get("control_freq") or DEFAULT_FPS
            fps = float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) else DEFAULT_FPS
        task = (env_args or {}).get("env_name") or src.stem
        provenance = {"source": "robomimic", "file": str(src), "env_args": env_args,
                      "filter_keys": filter_keys, "filter_key": filter_key, "demos": demos}
        with built_aside(out, overwrite) as tmp:
            store = TrajectoryStore.create(tmp, schema, fps=fps, task=str(task), provenance=provenance, image_codec=image_codec)
            for demo in demos:
                g = f["data"][demo]
                episode = {}
                for name, spec in schema.items():
                    key = "actions" if name == "action" else name
                    v = np.asarray((g["actions"] if name == "action" else g["obs"][name])[()])
                    if spec.dtype == "float32":
                        with np.errstate(over="ignore", invalid="ignore"):
                            v = v.astype(np.float32)
                        if (step := first_nonfinite_row(v)) is not None:
                            raise err(f"demo {demo!r} key {key!r} holds NaN or inf (or overflows float32) at step {step}")
                    episode[name] = v
                store.append_episode(episode)
    return TrajectoryStore.open(out, mode="r")
