"""Summarise a trajectory store: ``python -m il_policies.data.inspect PATH``.

Prints the store's metadata, episode statistics and one row per key with per-step
shape, dtype and value statistics over all steps and dims (rgb: min/max/mean only).
Reads every chunk, so it also validates the data.  Exit status 2 (one line on stderr)
if the store is missing, malformed or corrupt.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from il_policies.data.store import StoreError, TrajectoryStore


def key_stats(store: TrajectoryStore, key: str) -> dict:
    """min/max/mean/std over all steps and dims, streamed chunk by chunk (Chan et al. merge)."""
    n, mean, m2, lo, hi = 0, 0.0, 0.0, np.inf, -np.inf
    for _, rows in store.iter_chunks(key):
        x = rows.astype(np.float64, copy=False).ravel()
        if not x.size:
            continue
        k, m = x.size, float(x.mean())
        d = m - mean
        m2 += float(((x - m) ** 2).sum()) + d * d * n * k / (n + k)
        mean += d * k / (n + k)
        n += k
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
    if n == 0:
        return {}
    return {"min": lo, "max": hi, "mean": mean, "std": (m2 / n) ** 0.5}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def summarize(store: TrajectoryStore) -> str:
    lens = store.episode_lengths
    lines = [
        f"path:        {store.path}",
        f"format:      zarr v{store.zarr_format}" + (" (schema inferred)" if store.schema_inferred else ""),
        f"task:        {store.task}",
        f"fps:         {store.fps}",
        f"provenance:  {json.dumps(store.provenance, sort_keys=True)}",
        f"episodes:    {store.n_episodes}",
        f"steps:       {store.n_steps}",
        "length:      " + (f"min {lens.min()}  mean {lens.mean():.1f}  max {lens.max()}" if lens.size else "-"),
        f"seeds:       {'recorded' if store.episode_seeds is not None else 'none'}",
        *[f"stored:      {key}: {store.storage(key)}" for key in sorted(store.keys)],
        "",
    ]
    header = ("key", "kind", "shape", "dtype", "min", "max", "mean", "std")
    rows = [header]
    for key, spec in sorted(store.keys.items()):
        s = key_stats(store, key)
        std = None if spec.kind == "rgb" else s.get("std")
        rows.append((key, spec.kind, str(list(spec.shape)), spec.dtype,
                     _fmt(s.get("min")), _fmt(s.get("max")), _fmt(s.get("mean")), _fmt(std)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m il_policies.data.inspect",
                                     description="Summarise (and fully read) a trajectory store.")
    parser.add_argument("path", help="path of the .zarr store")
    args = parser.parse_args(argv)
    try:
        store = TrajectoryStore.open(args.path, mode="r")
        text = summarize(store)
    except StoreError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
