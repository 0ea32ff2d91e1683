"""Generate scripted-expert demonstrations: `python datasets/generate.py task=NAME n_episodes=50`.

Writes `datasets/NAME.zarr` (or `output=PATH`). Only successful episodes are kept unless
`keep_failures=true`; the same arguments always give the same store.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from il_policies.data.store import StoreError
from il_policies.envs import task_from_config
from il_policies.envs.demos import generate_demos

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    task = task_from_config(cfg.task)
    if task is None:
        sys.exit("error: generate.py needs a simulated task (e.g. task=metaworld_push), not task=dataset")
    try:
        store = generate_demos(
            task, cfg.output, cfg.n_episodes, seed_start=cfg.seed_start, keep_failures=cfg.keep_failures,
            overwrite=cfg.overwrite, n_envs=cfg.n_envs,
            task_options=OmegaConf.to_container(cfg.task.env_options, resolve=True),
        )
    except (StoreError, RuntimeError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {store.n_episodes} episodes ({store.n_steps} steps) to {store.path}; "
          f"expert succeeded on {store.provenance['expert_successes']} of {store.provenance['seeds_tried']} seeds")


if __name__ == "__main__":
    main()
