"""Per-task figures for the README: expert success, BC success at the default budget, wall times.

    python bench/task_table.py --tasks metaworld_push,metaworld_reach --episodes 50

For each task: the scripted expert through the rollout harness on the evaluation seeds; then
`train.py policy=bc task=TASK` at the default budget (it generates the 50 demonstrations when the
dataset is missing) and its final evaluation. Prints a markdown table and writes it (with the raw
figures as JSON) under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def expert_success(task_name: str, n_episodes: int) -> dict:
    from il_policies.envs import make_task_by_name
    from il_policies.rollout import ExpertActor, eval_seeds, run_rollouts

    task = make_task_by_name(task_name)
    result, _ = run_rollouts(task, ExpertActor(task, 1), eval_seeds(n_episodes), progress=False)
    return {"expert_success": result.success_rate, "expert_episodes": result.n_episodes, "expert_wall_s": result.wall_time_s}


def train_bc(task_name: str, n_episodes: int, out: Path, extra: list[str]) -> dict:
    dataset = REPO / "datasets" / f"{task_name}.zarr"
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "train.py", "policy=bc", f"task={task_name}", f"eval.n_episodes={n_episodes}", "eval.n_videos=1",
         f"hydra.run.dir={out / task_name}", "training.resume=false", *extra],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MUJOCO_GL": "egl"},
    )
    total = time.perf_counter() - start
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    summary = dict(item.split("=", 1) for item in run.stdout.strip().splitlines()[-1].split())
    generated = "not found: generating" in run.stdout + run.stderr
    return {
        "bc_success": float(summary["eval/success_rate"]),
        "bc_episodes": int(float(summary["eval/n_episodes"])),
        "bc_eval_s": float(summary["eval/wall_time_s"]),
        "train_py_total_s": total,
        "dataset_generated_in_run": generated,
        "dataset": str(dataset),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "task_table"))
    parser.add_argument("extra", nargs="*", help="extra train.py overrides")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task_name in args.tasks.split(","):
        row = {"task": task_name, **expert_success(task_name, args.episodes), **train_bc(task_name, args.episodes, out, args.extra)}
        rows.append(row)
        (out / "rows.jsonl").open("a").write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("| task | expert success | BC success (default budget) | train.py wall time (generate + train + evaluate) |")
    print("|---|---|---|---|")
    for r in rows:
        bc = f"{r['bc_success']:.2f} ({r['bc_episodes']} ep.)" if "bc_success" in r else r.get("error", "")
        wall = f"{r['train_py_total_s'] / 60:.1f} min" if "train_py_total_s" in r else ""
        print(f"| {r['task']} | {r['expert_success']:.2f} ({r['expert_episodes']} ep.) | {bc} | {wall} |")


if __name__ == "__main__":
    main()
