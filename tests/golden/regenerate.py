"""Write the golden references: `python -m tests.golden.regenerate [CONFIG ...]` (from the repository root).

For every registered policy config of the registry-wide tests (`tests/test_policies.py` CONFIGS, small
shapes): 3 fixed-seed training steps on the fixture image store, then one file `<config>.pt` that is a
checkpoint `load_policy` reads (inference weights only) plus a `golden` entry: observations and the
actions the policy gave for them, a training batch and the loss terms `compute_loss` gave for it under
a fixed seed. `tests/test_golden.py` recomputes both. Regenerate only for an intended change to a
network, a loss or the checkpoint format, and say so in the commit.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from il_policies.checkpoint import read_checkpoint, save_checkpoint
from il_policies.training import Workspace
from tests.conftest import make_cfg, write_linear_store
from tests.test_policies import CONFIGS, small_overrides

GOLDEN = Path(__file__).resolve().parent
OBS_INDICES, BATCH_INDICES = [0, 5, 9], [1, 2, 3, 4]
OVERRIDES = ["training.steps=3", "training.batch_size=8", "policy.n_obs_steps=2", "policy.horizon=4", "policy.n_action_steps=2"]


def golden_inputs(dataset):
    from il_policies.data.dataset import collate_batch, prepare_batch

    obs = prepare_batch(collate_batch(dataset.__getitems__(OBS_INDICES)), dataset.shape_meta, "cpu")["obs"]
    batch = prepare_batch(collate_batch(dataset.__getitems__(BATCH_INDICES)), dataset.shape_meta, "cpu")
    return obs, batch


def loss_terms(policy, batch) -> dict[str, float]:
    policy.train()
    torch.manual_seed(0)  # dropout masks and sampling noise
    loss, metrics = policy.compute_loss(batch)
    return {"loss": loss.item(), **metrics}


def sampling_generator() -> torch.Generator:
    """Sampling policies (Diffusion) draw their noise from it; the others ignore it."""
    return torch.Generator().manual_seed(0)


def main(only: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "image.zarr"
        write_linear_store(store, n_episodes=4, length=20, image_size=24)
        for name in only or CONFIGS:
            out = Path(tmp) / name
            workspace = Workspace(make_cfg([*small_overrides(name), f"task.dataset_path={store}", *OVERRIDES]), out)
            workspace.run()
            payload = read_checkpoint(out / "checkpoints" / "latest.pt")
            payload.pop("train_state")
            payload.pop("format")
            obs, batch = golden_inputs(workspace.dataset)
            policy = workspace.policy
            with workspace._inference_weights():
                policy.eval()
                actions = policy.predict_action_chunk(obs, sampling_generator())
                terms = loss_terms(policy, batch)
            payload["golden"] = {"obs": obs, "actions": actions, "batch": batch, "loss_terms": terms}
            path = save_checkpoint(GOLDEN / f"{name}.pt", payload)
            print(f"{path}: {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", choices=[[], *CONFIGS], help="configs to regenerate (default: all)")
    main(parser.parse_args().only)
