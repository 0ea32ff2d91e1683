"""The BVAE writeup's experiment: BC (same encoder), VAE+NN and BVAE on exactly 8 trajectories.

    python eval/compare.py [--task metaworld_push_image] [--steps 600] [--seeds 0,1,2] [--episodes 10] [--out outputs/bvae_compare]

For every seed and method, trains through the one Workspace (Hydra-composed configs; the split holds
out `--val-ratio` of the `--n-demos` episodes and trains on exactly 8 of the rest), then measures
every loss term in standard deviations (normalized units; eval mode, fixed noise seed) on the 8
training trajectories and on the held-out ones, and the success rate through the shared rollout
harness on `eval_seeds`. Writes, under `--out`: `results.json` (every number), `table.md` (mean ±
std over seeds, plus the writeup's claims checked against the measurement), `curves.png` (train and
held-out action_supervised vs step, mean ± std over seeds), and each run's directory (checkpoints;
`visualizations/step_N/latent_traversal.png`, the generative claim).

Budget: training dominates (BVAE's step costs most, BC's least); rollouts are capped at
`--max-episode-steps` (200; the push expert needs ~65-100 steps, a failing policy would run the
task's 500). The README gives the wall time of the default run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from il_policies.data.dataset import collate_batch, prepare_batch
from il_policies.envs import make_task_by_name
from il_policies.rollout import PolicyActor, eval_seeds, run_rollouts
from il_policies.training import Workspace

REPO = Path(__file__).resolve().parents[1]

# Keys are conf/policy configs: bc_conv_vae is the registry's `bc` with BVAE's encoder E.
METHODS = {"BC (same encoder)": "bc_conv_vae", "VAE+NN": "vae_nn", "BVAE": "bvae"}
TERMS = ("action_supervised", "obs_recon", "obs_supervised", "action_recon")
# Terms a method trains (others are untrained read-outs, or undefined for VAE+NN): shown as "—".
TRAINED = {"bc_conv_vae": {"action_supervised"}, "vae_nn": {"action_supervised", "obs_recon"}, "bvae": set(TERMS)}


def compose_cfg(args, policy: str, seed: int, run_dir: Path):
    overrides = [
        f"policy={policy}", f"task={args.task}", f"task.dataset_path={args.dataset}", f"task.n_demos={args.n_demos}",
        f"seed={seed}", "data.max_train_episodes=8", f"data.val_ratio={args.val_ratio}",
        f"training.steps={args.steps}", f"training.batch_size={args.batch_size}", f"training.val_every={args.val_every}",
        f"training.checkpoint_every={args.steps}", f"training.num_threads={args.threads}", "training.resume=false",
        "eval.n_episodes=0", "logger.mode=disabled", "device=cpu", f"hydra.run.dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@torch.no_grad()
def measure_terms(policy, dataset, batch_size: int = 256) -> dict[str, float]:
    """Every metric of `compute_loss` over a whole dataset, eval mode, fixed sampling noise."""
    policy.eval()
    torch.manual_seed(0)
    totals: dict[str, float] = {}
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch = prepare_batch(collate_batch(dataset.__getitems__(indices)), dataset.shape_meta, "cpu")
        _, metrics = policy.compute_loss(batch)
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * len(indices)
    return {key: value / len(dataset) for key, value in totals.items()}


def as_action_supervised(metrics: dict) -> dict:
    """BC names its one loss term `action_mse`; it is the same quantity as the VAEs' `action_supervised`."""
    renamed = {key.replace("action_mse", "action_supervised"): value for key, value in metrics.items() if "action_mse" in key}
    return {**metrics, **renamed}


def run_one(args, name: str, policy_name: str, seed: int) -> dict:
    run_dir = args.out / f"{policy_name}_seed{seed}"
    start = time.perf_counter()
    history = []  # every validation round's metrics, for the curves
    workspace = Workspace(compose_cfg(args, policy_name, seed, run_dir), run_dir,
                          on_round=lambda step, metrics: history.append({"step": step, **metrics}))
    workspace.run()
    train_s = time.perf_counter() - start
    policy = workspace.policy
    train_terms = as_action_supervised(measure_terms(policy, workspace.dataset))
    val_terms = as_action_supervised(measure_terms(policy, workspace.val_dataset))
    result, _ = run_rollouts(make_task_by_name(args.task), PolicyActor(policy.eval()), eval_seeds(args.episodes), progress=False,
                             max_episode_steps=args.max_episode_steps)
    record = {
        "method": name, "policy": policy_name, "seed": seed, "train_s": train_s, "rollout_s": result.wall_time_s,
        "train_episodes": workspace.dataset.train_episode_ids.tolist(), "val_episodes": workspace.dataset.val_episode_ids.tolist(),
        "train": train_terms, "val": val_terms, "success_rate": result.success_rate, "successes": result.successes,
        "history": [as_action_supervised(h) for h in history], "traversal": str(run_dir / "visualizations" / f"step_{args.steps}" / "latent_traversal.png"),
    }
    print(f"{name} seed {seed}: train action_supervised {train_terms['action_supervised']:.3f}, held-out "
          f"{val_terms['action_supervised']:.3f}, success {result.success_rate:.2f} ({train_s:.0f} s train, "
          f"{result.wall_time_s:.0f} s rollouts)", flush=True)
    return record


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def table(records: list[dict], args) -> str:
    lines = [f"Task `{args.task}`, 8 training trajectories, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
             f"{args.steps} steps at batch {args.batch_size}, {args.episodes} rollouts per run (at most {args.max_episode_steps} "
             "steps each). Loss terms in standard deviations "
             "(mean ± std over seeds); — : a term the method does not have (BC has no decoder; VAE+NN has no "
             "action-to-observation pass).", ""]
    header = ["method"] + [f"{split} {term}" for term in TERMS for split in ("train", "held-out")] + ["success rate"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, policy_name in METHODS.items():
        rows = [r for r in records if r["policy"] == policy_name]
        if not rows:
            continue
        cells = [name]
        for term in TERMS:
            for split in ("train", "val"):
                cells.append(mean_std([r[split][term] for r in rows]) if term in TRAINED[policy_name] else "—")
        cells.append(mean_std([r["success_rate"] for r in rows]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *claims(records)]) + "\n"


def claims(records: list[dict]) -> list[str]:
    def avg(policy, split):
        values = [r[split]["action_supervised"] for r in records if r["policy"] == policy]
        return float(np.mean(values)) if values else float("nan")

    def lower(a, b, split):  # seeds on which method a is below method b (same seed: same episode split)
        pairs = {r["seed"]: r[split]["action_supervised"] for r in records if r["policy"] == a}
        other = {r["seed"]: r[split]["action_supervised"] for r in records if r["policy"] == b}
        seeds = sorted(set(pairs) & set(other))
        return f"{sum(pairs[s] < other[s] for s in seeds)}/{len(seeds)} seeds"

    bc_t, vae_t, bvae_t = avg("bc_conv_vae", "train"), avg("vae_nn", "train"), avg("bvae", "train")
    bc_v, vae_v, bvae_v = avg("bc_conv_vae", "val"), avg("vae_nn", "val"), avg("bvae", "val")
    return [
        "Writeup claims vs this measurement (action_supervised, mean over seeds):",
        f"1. Accurate — train: BVAE {bvae_t:.3f}, BC {bc_t:.3f} (BVAE/BC = {bvae_t / bc_t:.2f}), VAE+NN {vae_t:.3f}. "
        f"BVAE below VAE+NN on {lower('bvae', 'vae_nn', 'train')}, below BC on {lower('bvae', 'bc_conv_vae', 'train')}.",
        f"2. Versatile — held-out: BVAE {bvae_v:.3f}, BC {bc_v:.3f}, VAE+NN {vae_v:.3f} (VAE+NN/BVAE = {vae_v / bvae_v:.2f}x; "
        f"writeup ~460x). BVAE below BC on {lower('bvae', 'bc_conv_vae', 'val')}, below VAE+NN on "
        f"{lower('bvae', 'vae_nn', 'val')}; compare the gaps with the ± std columns before calling a winner.",
        "3. Generative — see each BVAE run's visualizations/step_N/latent_traversal.png.",
    ]


def curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, key, title in ((axes[0], "train/action_supervised", "train (last batch)"), (axes[1], "val/action_supervised", "held-out")):
        for name, policy_name in METHODS.items():
            runs = [r["history"] for r in records if r["policy"] == policy_name]
            if not runs:
                continue
            steps = [h["step"] for h in runs[0]]
            values = np.array([[h.get(key, np.nan) for h in run] for run in runs])
            mean, std = values.mean(axis=0), values.std(axis=0)
            ax.plot(steps, mean, label=name)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"action_supervised, {title}")
        ax.set_xlabel("step")
        ax.set_ylabel("MSE (standard deviations²)")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def previous_runs(path: Path, settings: dict, wanted: list[str]) -> tuple[list[dict], float]:
    """Runs of the methods not asked for this time, from an earlier results.json with the same settings
    (so one method can be re-run without re-running the others); their share of its wall time."""
    if not path.is_file():
        return [], 0.0
    saved = json.loads(path.read_text())
    if any(saved.get(key) != value for key, value in settings.items()):
        return [], 0.0
    kept = [r for r in saved["runs"] if r["policy"] not in wanted and r["policy"] in METHODS.values()]
    if kept:
        print(f"keeping {len(kept)} runs of {sorted({r['policy'] for r in kept})} from {path}")
    share = sum(r["train_s"] + r["rollout_s"] for r in kept) / max(sum(r["train_s"] + r["rollout_s"] for r in saved["runs"]), 1e-9)
    return kept, saved["wall_s"] * share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="metaworld_push_image")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--episodes", type=int, default=10, help="rollouts per run, on eval_seeds")
    parser.add_argument("--max-episode-steps", type=int, default=200,
                        help="rollout length cap (the push expert needs ~65-100 steps; the task's own limit is 500)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--n-demos", type=int, default=16, help="demonstrations generated (8 train, val-ratio held out)")
    parser.add_argument("--val-ratio", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS.values()),
                        help="subset of " + ",".join(METHODS.values()) + "; the other methods' runs are kept from --out/results.json "
                        "when its settings match")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bvae_compare")
    parser.add_argument("--summarize", action="store_true", help="only rebuild table.md and curves.png from --out/results.json")
    args = parser.parse_args()
    if args.summarize:
        saved = json.loads((args.out / "results.json").read_text())
        for key in ("task", "steps", "seeds", "episodes", "batch_size"):
            setattr(args, key, saved[key])
        args.max_episode_steps = saved.get("max_episode_steps", args.max_episode_steps)
        text = table(saved["runs"], args) + f"\nWall time: {saved['wall_s'] / 60:.1f} min.\n"
        (args.out / "table.md").write_text(text)
        curves(saved["runs"], args.out / "curves.png")
        print(text)
        return
    args.dataset = REPO / "datasets" / f"bvae_compare_{args.task}_{args.n_demos}.zarr"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    wanted = args.methods.split(",")
    settings = {"task": args.task, "steps": args.steps, "seeds": args.seeds, "episodes": args.episodes,
                "batch_size": args.batch_size, "max_episode_steps": args.max_episode_steps}
    kept, kept_s = previous_runs(args.out / "results.json", settings, wanted)
    start = time.perf_counter()
    records = [run_one(args, name, policy, seed) for seed in args.seeds for name, policy in METHODS.items() if policy in wanted]
    summary = {**settings, "wall_s": kept_s + time.perf_counter() - start, "runs": kept + records}
    records = summary["runs"]
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    text = table(records, args) + f"\nWall time: {summary['wall_s'] / 60:.1f} min.\n"
    (args.out / "table.md").write_text(text)
    curves(records, args.out / "curves.png")
    print(text)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'curves.png'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
