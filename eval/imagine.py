"""Imagined futures of a world-model checkpoint (`policy=latent_bc`) on its held-out episodes.

    python eval/imagine.py checkpoint=outputs/.../checkpoints/best.pt n_context=5 n_predict=20

Filters `n_context` frames, predicts `n_predict` steps open loop from the recorded actions, and writes
to the Hydra run directory: metrics.json (PSNR and SSIM per prediction step, beside copying the last
context frame), psnr_ssim.png (the curves) and imagination.gif (true frames above imagined ones).
"""

import json
import sys
from pathlib import Path

import hydra
import imageio.v2 as imageio
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from il_policies import load_policy
from il_policies.checkpoint import CheckpointError, read_checkpoint
from il_policies.data.store import TrajectoryStore
from il_policies.imagination import held_out_episodes, imagine_episodes, plot_curves, side_by_side_frames
from il_policies.training.validate import check_device, check_integers

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="imagine", version_base="1.3")
def main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if not cfg.checkpoint:
            raise ValueError("give checkpoint=PATH (a latent_bc checkpoint)")
        check_integers({"n_context": cfg.n_context, "n_predict": cfg.n_predict, "stride": cfg.stride}, minimum=1)
        check_integers({"n_videos": cfg.n_videos}, minimum=0)
        check_device(cfg.device)
        policy = load_policy(cfg.checkpoint, device=cfg.device)
        if not hasattr(policy, "imagine"):
            raise ValueError(f"checkpoint {cfg.checkpoint} holds policy {policy.name!r}, which has no world model (train policy=latent_bc)")
        payload = read_checkpoint(cfg.checkpoint)
        store = TrajectoryStore.open(cfg.dataset_path or policy.checkpoint_meta["task"]["dataset_path"])
        episodes = held_out_episodes(payload, store)
        result = imagine_episodes(policy, store, episodes, cfg.n_context, cfg.n_predict, cfg.stride, keep_frames=cfg.n_videos)
    except (CheckpointError, ValueError) as error:  # StoreError is a ValueError
        sys.exit(f"error: {error}")
    summary = {"checkpoint": str(cfg.checkpoint), "step": policy.checkpoint_meta["step"], "n_context": cfg.n_context,
               "n_predict": cfg.n_predict, "episodes": [int(e) for e in episodes], **result.summary()}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    plot_curves(summary, output_dir / "psnr_ssim.png")
    if result.frames:
        imageio.mimsave(output_dir / "imagination.gif", side_by_side_frames(result.frames), duration=0.2, loop=0)
    print(json.dumps({k: summary[k] for k in ("n_windows", "psnr", "copy_last_psnr", "beats_copy_last_at_every_step")}))


if __name__ == "__main__":
    main()
