"""A benchmark's results: `results.csv` (one row per run), `table.md` (means with 95 % t intervals
over seeds, paired differences where the seeds match), and PNG curves against step and wall time.

Rows from different code versions are never averaged silently: a group that mixes them is marked
in the table, and the versions are listed under it.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import stats

from il_policies.benchmark.plan import read_curves

SUCCESS, VAL_LOSS = "eval/success_rate", "val/loss"
FIRST_COLUMNS = ["cell", "task", "policy", "train_episodes", "seed", "steps", "wall_time_s", "code_version", "machine",
                 "finished", "policy_overrides"]



def _by_count(episodes) -> tuple[bool, int]:
    """Numbers of training episodes in increasing order, every episode (None) last."""
    return episodes is None, episodes or 0

def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval over the values (ddof 1); (mean, nan, nan) for one value."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def load_results(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").glob("*/result.json")):
        rows.append(json.loads(path.read_text()))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    metric_keys = sorted({k for r in rows for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIRST_COLUMNS + metric_keys)
        for r in rows:
            writer.writerow([" ".join(r[c]) if c == "policy_overrides" else r[c] for c in FIRST_COLUMNS]
                            + [r["metrics"].get(k, "") for k in metric_keys])


def _fmt(mean: float, low: float, high: float, digits: int = 2) -> str:
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _group(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["train_episodes"], r["policy"])].append(r)
    return groups


def markdown_table(rows: list[dict], metrics: Sequence[str] = (SUCCESS, VAL_LOSS), paired: Sequence[str] = (SUCCESS,)) -> str:
    """Means over seeds of each of `metrics` with 95 % t intervals, then paired differences of each
    of `paired` where seeds match. A metric a run does not report shows as —."""
    versions = sorted({r["code_version"] for r in rows})
    lines = ["| task | training episodes | policy | seeds | " + " | ".join(metrics) + " | wall time (min) |",
             "|---|---|---|---|" + "---|" * len(metrics) + "---|"]
    for (task, episodes, policy), group in sorted(_group(rows).items(), key=lambda kv: (kv[0][0], _by_count(kv[0][1]), kv[0][2])):
        cells = []
        for key in metrics:
            values = [v for r in group if (v := curve_value(r["metrics"], key)) is not None]
            cells.append(_fmt(*mean_ci(values), digits=2 if key == SUCCESS else 4) if values else "—")
        wall = _fmt(*mean_ci([r["wall_time_s"] / 60 for r in group]), digits=1)
        mark = " †" if len({r["code_version"] for r in group}) > 1 else ""
        lines.append(f"| {task} | {episodes or 'all'} | {policy}{mark} | {len(group)} | {' | '.join(cells)} | {wall} |")
    lines += ["", "Means over seeds with 95 % Student-t intervals [low, high]."]
    for key in paired:
        differences = paired_differences(rows, key)
        if differences:
            name = "success" if key == SUCCESS else key
            digits = 2 if key == SUCCESS else 4
            lines += ["", f"| task | training episodes | {name}: A - B | seeds paired | difference [95 % interval] |", "|---|---|---|---|---|"]
            lines += [f"| {t} | {e or 'all'} | {a} - {b} | {n} | {_fmt(m, lo, hi, digits)} |" for t, e, a, b, n, m, lo, hi in differences]
    if len(versions) > 1:
        lines += ["", f"† this group mixes code versions. Versions in this table: {', '.join(versions)}."]
    else:
        lines += ["", f"Code version: {versions[0]}." if versions else ""]
    lines.append(f"Machine: {'; '.join(sorted({r['machine'] for r in rows}))}.")
    return "\n".join(lines) + "\n"


def paired_differences(rows: list[dict], key: str = SUCCESS) -> list[tuple]:
    """`key` (success by default) of policy A minus policy B on the same task, training episodes and
    seeds (the same episode split): (task, episodes, A, B, n, mean, low, high) for every pair with
    >= 2 common seeds."""
    out = []
    by_key = _group(rows)
    for task, episodes in sorted({(t, e) for t, e, _ in by_key}, key=lambda k: (k[0], _by_count(k[1]))):
        policies = sorted(p for t, e, p in by_key if (t, e) == (task, episodes))
        for a, b in combinations(policies, 2):
            sa = {r["seed"]: curve_value(r["metrics"], key) for r in by_key[(task, episodes, a)]}
            sb = {r["seed"]: curve_value(r["metrics"], key) for r in by_key[(task, episodes, b)]}
            common = sorted(s for s in set(sa) & set(sb) if sa[s] is not None and sb[s] is not None)
            if len(common) >= 2:
                out.append((task, episodes, a, b, len(common), *mean_ci([sa[s] - sb[s] for s in common])))
    return out


def curve_value(row: Mapping, key: str) -> float | None:
    """A curve row's `key`; BC logs its action error as `action_mse`, the VAEs' `action_supervised`."""
    if key in row:
        return row[key]
    return row.get(key.replace("action_supervised", "action_mse")) if "action_supervised" in key else None


def plot_curves(rows: list[dict], out: Path, keys: Sequence[str] = (SUCCESS, VAL_LOSS)) -> list[Path]:
    """Per task and number of training episodes: each of `keys` (one row of plots each) against
    step and against wall time, one curve per policy (mean over seeds, 95 % t band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_plot: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_plot[(r["task"], r["train_episodes"])][r["policy"]].append(r)
    for (task, episodes), policies in sorted(by_plot.items(), key=lambda kv: (kv[0][0], _by_count(kv[0][1]))):
        fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.5 * len(keys)), squeeze=False)
        colors = {policy: f"C{i % 10}" for i, policy in enumerate(sorted(policies))}  # one colour per policy in every panel
        for policy, runs in sorted(policies.items()):
            curves = [{c["step"]: c for c in read_curves(out / "cells" / r["cell"] / "metrics.jsonl")} for r in runs]
            for row, key in enumerate(keys):
                steps = sorted(set.intersection(*[{s for s, c in curve.items() if curve_value(c, key) is not None} for curve in curves]))
                if not steps:
                    continue
                values = np.array([[curve_value(curve[s], key) for s in steps] for curve in curves])
                elapsed = np.array([[curve[s]["elapsed_s"] for s in steps] for curve in curves])
                bands = np.array([mean_ci(values[:, i]) for i in range(len(steps))])
                for col, x in enumerate((np.array(steps), elapsed.mean(axis=0) / 60)):
                    ax = axes[row, col]
                    ax.plot(x, bands[:, 0], marker="o", markersize=3, color=colors[policy], label=f"{policy} ({len(runs)} seeds)")
                    if len(runs) > 1:
                        ax.fill_between(x, bands[:, 1], bands[:, 2], color=colors[policy], alpha=0.2)
                    ax.set_xlabel("training step" if col == 0 else "wall time (min)")
                    ax.set_ylabel(key)
        for ax in axes.flat:
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(f"{task}, {episodes or 'all'} training episodes")
        fig.tight_layout()
        path = out / f"curves_{task}_{episodes or 'all'}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out: Path, metrics: Sequence[str] = (SUCCESS, VAL_LOSS), curves: Sequence[str] = (SUCCESS, VAL_LOSS),
                 paired: Sequence[str] = (SUCCESS,)) -> str:
    rows = load_results(out)
    if not rows:
        return "no finished cells yet\n"
    write_csv(rows, out / "results.csv")
    table = markdown_table(rows, list(metrics), list(paired))
    (out / "table.md").write_text(table)
    plot_curves(rows, out, list(curves))
    return table
