"""One benchmark runner for tasks x policies x seeds x training episodes: `python eval/benchmark.py benchmark=NAME`.

The grid is `conf/benchmark/NAME.yaml`; each cell is one ordinary `train.py` run in its own
directory under `out` (default `outputs/benchmark/NAME`). This command:

1. generates every simulated task's demonstrations that are missing (once, before any cell runs);
2. runs the cells without a `result.json` as one Hydra multirun of this script (`cell=i,j,...`)
   through a Hydra launcher: `launcher=joblib` (default; `jobs` cells at once on this machine),
   `launcher=basic` (one after another, in one process), or `launcher=submitit_slurm` for a SLURM
   cluster (`pip install -e '.[cluster]'`; `launcher_overrides=[hydra.launcher.partition=NAME,...]`).
   A finished cell is skipped; an interrupted one resumes from its `latest` checkpoint;
3. writes `results.csv`, `table.md` (means with 95 % intervals, paired differences) and the
   `curves_*.png` plots under `out`, and prints the table.

A second invocation after everything finished trains nothing and only rewrites the report.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

try:  # installed with `pip install -e .`; otherwise run from a checkout
    import il_policies  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from il_policies.benchmark.plan import REPO, BenchmarkError, dataset_path, plan_cells, run_cell  # noqa: E402
from il_policies.benchmark.report import write_report  # noqa: E402

LAUNCHERS = ("joblib", "basic", "submitit_slurm", "submitit_local")


def launcher_overrides(cfg: DictConfig) -> list[str]:
    if cfg.launcher not in LAUNCHERS:
        raise BenchmarkError(f"benchmark value launcher={cfg.launcher!r} is invalid: it must be one of {', '.join(LAUNCHERS)}.")
    chosen = [f"hydra/launcher={cfg.launcher}"]
    if cfg.launcher == "joblib":
        chosen.append(f"hydra.launcher.n_jobs={cfg.jobs}")
    return chosen + list(cfg.launcher_overrides)


def ensure_datasets(bench: DictConfig) -> None:
    """Generate (or finish) each simulated task's demonstrations before the cells share them."""
    from hydra import compose  # this app's Hydra is initialized on conf/, train.py's config directory too

    import il_policies.training.config  # noqa: F401  (registers the schemas train.py's config needs)
    from il_policies.envs import task_from_config
    from il_policies.envs.demos import ensure_demos

    for task_name in bench.tasks:
        overrides = [f"task={task_name}", *[o for o in bench.overrides if o.startswith(("task.", "+task."))]]
        task_cfg = compose(config_name="config", overrides=overrides).task
        task = task_from_config(task_cfg)
        if task is not None:
            path = dataset_path(bench, task_name) or task_cfg.dataset_path
            ensure_demos(task, path, int(task_cfg.n_demos), OmegaConf.to_container(task_cfg.env_options, resolve=True))


def launch(cfg: DictConfig, cells: list, pending: list[int], out: Path) -> int:
    """One Hydra multirun of this script over the pending cells; a progress bar over finished cells."""
    passed = [o for o in HydraConfig.get().overrides.task if not o.startswith(("cell=", "out=", "hydra"))]
    command = [sys.executable, str(Path(__file__).resolve()), "-m", *passed, f"out={out}",
               f"cell={','.join(map(str, pending))}", *launcher_overrides(cfg)]
    with open(out / "launcher.log", "a") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc=f"benchmark {cfg.benchmark.name}", unit="cell")
        while process.poll() is None:
            time.sleep(2)
            bar.update(sum(c.done(out) for c in cells) - bar.n)
        bar.update(sum(c.done(out) for c in cells) - bar.n)
        bar.close()
    return process.returncode


@hydra.main(config_path=str(REPO / "conf"), config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out).absolute()
    try:
        cells = plan_cells(cfg.benchmark)
        if cfg.cell is not None:  # one job of the multirun: a failure must not stop the others
            try:
                run_cell(cfg.benchmark, cells[int(cfg.cell)], out)
            except RuntimeError as error:  # the driver reports every cell left without a result
                print(f"error: {error}", file=sys.stderr)
            return
        launcher_overrides(cfg)
        out.mkdir(parents=True, exist_ok=True)
        pending = [c.index for c in cells if not c.done(out)]
        print(f"benchmark {cfg.benchmark.name}: {len(cells)} cells, {len(cells) - len(pending)} finished, "
              f"{len(pending)} to run; results under {out}", flush=True)
        if pending:
            ensure_datasets(cfg.benchmark)
            if launch(cfg, cells, pending, out) != 0:
                failed = [cells[i].name for i in pending if not cells[i].done(out)]
                print(f"error: {len(failed)} cells did not finish (first: {failed[0] if failed else '?'}); "
                      f"see {out / 'launcher.log'} and each cell's train.log; rerun the same command to retry them",
                      file=sys.stderr)
        default = ["eval/success_rate", "val/loss"]
        metrics, curves = cfg.benchmark.get("metrics") or default, cfg.benchmark.get("curves") or default
        paired = cfg.benchmark.get("paired") or ["eval/success_rate"]
        print(write_report(out, list(metrics), list(curves), list(paired)), end="")
        if any(not c.done(out) for c in cells):
            sys.exit(1)
    except (BenchmarkError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
