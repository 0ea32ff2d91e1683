"""Latent traversal grid of a trained BVAE (or VAE+NN) checkpoint.

    python eval/latent_traversal.py checkpoint=PATH [out=grid.png] [index=0] [split=val] [values=-2,-1,0,1,2] [max_dims=16]

Takes sample `index` of the checkpoint's dataset (`task_meta.dataset_path`, the `split` episodes
of the training run's split), encodes it, and writes a PNG: one row per latent coordinate, first
the real image, then the decoded image with that coordinate moved by each of `values` standard
deviations. Prints the PNG's path.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from il_policies import load_policy
from il_policies.checkpoint import CheckpointError, read_checkpoint
from il_policies.data.dataset import SequenceDataset, collate_batch, prepare_batch
from il_policies.visualization import traversal_grid, write_png

OPTIONS = {"checkpoint": None, "out": "latent_traversal.png", "index": "0", "split": "val", "values": "-2,-1,0,1,2", "max_dims": "16"}


def main(argv: list[str]) -> Path:
    options = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise ValueError(f"unknown argument {arg!r}; use key=value with keys {sorted(options)}")
        options[key] = value
    if not options["checkpoint"]:
        raise ValueError("give checkpoint=PATH")
    policy = load_policy(options["checkpoint"])
    if not hasattr(policy, "vae") or not policy.vae.rgb_keys:
        raise ValueError(f"checkpoint {options['checkpoint']} holds a {policy.name!r} policy without a conv VAE on images")
    dataset_path = policy.checkpoint_meta["task"].get("dataset_path")
    if not dataset_path or not Path(dataset_path).exists():
        raise ValueError(f"the checkpoint's dataset {dataset_path!r} is not here: the traversal needs a real sample")
    dataset = SequenceDataset.from_store(dataset_path, n_obs_steps=policy.config.n_obs_steps, horizon=policy.config.horizon,
                                         **_split_options(options["checkpoint"]))
    if options["split"] == "val" and len(dataset.get_validation_dataset()):
        dataset = dataset.get_validation_dataset()
    index = int(options["index"]) % len(dataset)
    batch = prepare_batch(collate_batch(dataset.__getitems__([index])), dataset.shape_meta, policy.device)
    obs = policy.normalize_obs(batch["obs"])
    values = [float(v) for v in options["values"].split(",")]
    grid = traversal_grid(policy, obs, values=values, max_dims=int(options["max_dims"]))
    return write_png(grid, options["out"])


def _split_options(checkpoint: str) -> dict:
    """The training run's episode split (val_ratio, seed, max_train_episodes), from its saved config."""
    config_yaml = read_checkpoint(checkpoint).get("config_yaml")
    if not config_yaml:
        return {}
    cfg = OmegaConf.create(config_yaml)
    return {"val_ratio": cfg.data.val_ratio, "seed": cfg.seed, "max_train_episodes": cfg.data.max_train_episodes}


if __name__ == "__main__":
    try:
        print(main(sys.argv[1:]))
    except (CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
