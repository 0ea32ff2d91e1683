"""Train any registered policy on any task: `python train.py policy=bc task=NAME training.steps=N`.

Multirun: `python train.py -m policy=bc,bvae seed=0,1,2`. Data-parallel: `torchrun --nproc_per_node=2 train.py ...`.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from il_policies.checkpoint import CheckpointError
from il_policies.training import NonFiniteLossError, Workspace


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        workspace = Workspace(cfg, HydraConfig.get().runtime.output_dir)
        summary = workspace.run()
    except (NonFiniteLossError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if workspace.ctx.is_main:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
