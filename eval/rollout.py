"""Evaluate a checkpoint (or the scripted expert) through the shared rollout harness.

    python eval/rollout.py checkpoint=outputs/.../checkpoints/best.pt n_episodes=50
    python eval/rollout.py policy=expert task=metaworld_push
    python eval/rollout.py checkpoint=... latency_steps=5 blend=linear   # asynchronous chunks, simulated delay

Writes metrics.json and mp4 videos of the first `n_videos` episodes to the Hydra run directory.
"""

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from il_policies import load_policy
from il_policies.checkpoint import CheckpointError
from il_policies.chunk_executor import ChunkExecutorActor
from il_policies.envs import make_task, task_from_config
from il_policies.rollout import ExpertActor, PolicyActor, check_policy_matches_task, eval_seeds, run_rollouts
from il_policies.training.validate import check_device, check_integers

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="rollout", version_base="1.3")
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    task = task_from_config(cfg.task) if cfg.get("task") else None
    try:
        check_integers({"n_episodes": cfg.n_episodes, "n_envs": cfg.n_envs}, minimum=1)
        check_integers({"n_videos": cfg.n_videos, "seed_start": cfg.seed_start}, minimum=0)
        check_device(cfg.device)
        if cfg.get("policy") and cfg.policy.name == "expert":
            if task is None:
                raise ValueError("policy=expert needs a simulated task, e.g. task=metaworld_push")
            actor = ExpertActor(task, cfg.n_envs)
        elif cfg.get("policy"):
            raise ValueError(f"policy={cfg.policy.name} is not evaluable by name: give checkpoint=PATH, or policy=expert")
        else:
            if not cfg.checkpoint:
                raise ValueError("give checkpoint=PATH (or policy=expert task=NAME)")
            policy = load_policy(cfg.checkpoint, device=cfg.device)
            meta = policy.checkpoint_meta["task"]
            if task is None:
                if meta.get("suite") in (None, "dataset"):
                    raise ValueError(f"checkpoint {cfg.checkpoint} was trained on a plain dataset: give task=NAME")
                task = make_task(meta["suite"], meta["env_name"], bool(meta.get("image")), **(meta.get("env_options") or {}))
            check_policy_matches_task(policy.shape_meta, task, source=f"checkpoint {cfg.checkpoint}")
            if cfg.latency_steps is None:
                actor = PolicyActor(policy)
            else:
                check_integers({"latency_steps": cfg.latency_steps}, minimum=0)
                actor = ChunkExecutorActor(policy, cfg.n_envs, cfg.latency_steps, blend=cfg.blend, threshold=cfg.threshold,
                                           commit_steps=cfg.commit_steps)
    except (CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
    result, _ = run_rollouts(
        task, actor, eval_seeds(cfg.n_episodes, cfg.seed_start), n_envs=cfg.n_envs,
        asynchronous=cfg.asynchronous, video_dir=output_dir / "videos", n_videos=cfg.n_videos,
    )
    extra = {}
    if isinstance(actor, ChunkExecutorActor):  # how smoothly the chunks joined
        jumps = actor.boundary_jumps
        extra = {"latency_steps": cfg.latency_steps, "blend": cfg.blend, "chunk_boundaries": len(jumps),
                 "boundary_jump_max": max(jumps, default=0.0), "boundary_jump_mean": sum(jumps) / len(jumps) if jumps else 0.0}
    result.write_json(output_dir / "metrics.json", extra)
    print(json.dumps({"task": task.name, "policy": cfg.policy.name if cfg.get("policy") else cfg.checkpoint, **result.summary(),
                      **extra, "videos": result.videos}))


if __name__ == "__main__":
    main()
