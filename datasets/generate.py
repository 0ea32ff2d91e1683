"""Generate scripted-expert demonstrations: `python datasets/generate.py task=NAME n_episodes=50`.

Writes `datasets/NAME.zarr` (or `output=PATH`). Only successful episodes are kept unless
`keep_failures=true`; the same arguments always give the same store. Rerunning an interrupted
command continues its store; a store generated with other arguments is refused (`overwrite=true`
replaces it).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from il_policies.data.store import StoreError
from il_policies.envs import task_from_config
from il_policies.envs.demos import generate_demos
from il_policies.training.validate import check_integers

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    task = task_from_config(cfg.task)
    if task is None:
        sys.exit("error: generate.py needs a simulated task (e.g. task=metaworld_push), not task=dataset")
    try:
        check_integers({"n_episodes": cfg.n_episodes, "n_envs": cfg.n_envs}, minimum=1)
        check_integers({"seed_start": cfg.seed_start}, minimum=0)
        store = generate_demos(
            task, cfg.output, cfg.n_episodes, seed_start=cfg.seed_start, keep_failures=cfg.keep_failures,
            overwrite=cfg.overwrite, n_envs=cfg.n_envs, image_codec=cfg.image_codec,
            task_options=OmegaConf.to_container(cfg.task.env_options, resolve=True),
        )
    except (StoreError, RuntimeError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"{store.path} holds {store.n_episodes} episodes ({store.n_steps} steps); the "
          f"expert succeeded on {store.provenance['expert_successes']} of the {store.provenance['seeds_tried']} seeds it needed")


if __name__ == "__main__":
    main()
