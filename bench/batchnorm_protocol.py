"""How the writeup's validation protocol moves its metric: BatchNorm in eval mode vs train mode at batch 1.

    python bench/batchnorm_protocol.py CHECKPOINT   # e.g. a bvae_original cell of benchmark=bvae_writeup

The original BVAE code validated with its networks in train mode, one image at a time, so every
BatchNorm layer normalized each image by that image's own statistics (instance normalization)
instead of the running statistics eval mode uses. This prints the policy's `action_supervised`
(MSE of E's mean action in SDs) on the checkpoint's training and held-out split both ways; the
running statistics are not updated (momentum 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

from latent_traversal import _split_options  # noqa: E402

from il_policies import load_policy  # noqa: E402
from il_policies.data.dataset import SequenceDataset, collate_batch, prepare_batch  # noqa: E402


@torch.no_grad()
def action_error(policy, dataset, per_image_statistics: bool) -> float:
    policy.eval()
    if per_image_statistics:
        for module in policy.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.train()
                module.momentum = 0.0
    total = 0.0
    for index in range(len(dataset)):
        batch = prepare_batch(collate_batch(dataset.__getitems__([index])), dataset.shape_meta, policy.device)
        predicted = policy.normalizer.normalize("action", policy.predict_action_chunk(batch["obs"]))
        total += (predicted - policy.normalizer.normalize("action", batch["action"])).square().mean().item()
    return total / len(dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(args.checkpoint)
    dataset = SequenceDataset.from_store(policy.checkpoint_meta["task"]["dataset_path"], n_obs_steps=policy.config.n_obs_steps,
                                         horizon=policy.config.horizon, **_split_options(args.checkpoint))
    for name, split in (("training", dataset), ("held-out", dataset.get_validation_dataset())):
        eval_mode = action_error(load_policy(args.checkpoint), split, per_image_statistics=False)
        batch_one = action_error(load_policy(args.checkpoint), split, per_image_statistics=True)
        print(f"{name:9s} action_supervised: eval mode {eval_mode:.3f}, train mode at batch 1 {batch_one:.3f} "
              f"({len(split)} samples, one at a time)")


if __name__ == "__main__":
    main()
