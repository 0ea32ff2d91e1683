#!/usr/bin/env python
"""How precisely can an image encoder read Meta-World push's puck and goal from 45 demonstrations?

A perception probe for `metaworld_push_image`: the scripted expert runs on the training seeds (0..44,
as BC's 45 training episodes of the default 50) and on held-out seeds (1,000,000 up), every frame
recorded with the simulator's positions. An image encoder of `il_policies.nn.vision` (the one the
policies use) plus a small MLP is trained to regress, from the frame alone, the two relative positions
the expert acts on: puck - hand and goal - puck (x, y). Printed: the mean absolute error in cm on the
training frames and on the held-out frames, per encoder option. The success radius of the task is 5 cm.

    python bench/push_image_probe.py                                  # the default encoder and two options
    python bench/push_image_probe.py --variants grid,spatial_softmax --augment shift --size 128
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from il_policies.envs.metaworld import MetaWorldEnv, MetaWorldExpert  # noqa: E402
from il_policies.nn.augment import ObservationAugment  # noqa: E402
from il_policies.nn.vision import ImageEncoder  # noqa: E402
from il_policies.policies.config import AugmentConfig, VisionConfig  # noqa: E402

LABELS = ("puck-hand x", "puck-hand y", "goal-puck x", "goal-puck y")


def expert_frames(seeds, size: int, camera: str):
    """Every frame of the expert's episodes on `seeds` (until success) and the (4,) relative positions in m."""
    env, expert = MetaWorldEnv("push-v3", image=True, image_size=size, camera=camera), MetaWorldExpert("push-v3")
    images, labels = [], []
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        for _ in range(env.max_episode_steps):
            raw = info["expert_obs"]  # hand xyz, gripper, puck xyz ..., goal xyz last
            images.append(obs["image"])
            labels.append(np.r_[raw[4:6] - raw[0:2], raw[-3:-1] - raw[4:6]])
            obs, _, _, _, info = env.step(expert.act(obs, info))
            if info["is_success"]:
                break
    env.close()
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(np.stack(labels), dtype=torch.float32)


def goal_pixel_scale(size: int, camera: str, seeds) -> tuple[np.ndarray, np.ndarray, int]:
    """Pixels per cm of goal displacement (image x and y per goal x, per goal y), the goal's pixel spread
    over `seeds`, and the most pixels the goal dot covers: where the green goal site lands in the frame."""
    env = MetaWorldEnv("push-v3", image=True, image_size=size, camera=camera)
    centers, goals, sizes = [], [], []
    for seed in seeds:
        obs, info = env.reset(seed=seed)
        red, green, blue = (obs["image"][..., c].astype(int) for c in range(3))
        ys, xs = np.nonzero((green > 150) & (red < 100) & (blue < 100))
        if len(xs):
            centers.append((xs.mean(), ys.mean()))
            goals.append(info["expert_obs"][-3:-1])
            sizes.append(len(xs))
    env.close()
    centers, goals = np.array(centers), np.array(goals)
    slope = np.linalg.lstsq(np.c_[goals, np.ones(len(goals))], centers, rcond=None)[0][:2] / 100  # (goal x|y) x (px x, px y)
    return slope, np.ptp(centers, axis=0), max(sizes)


def probe(pool: str, augment: str, train, held_out, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    (x_train, y_train), (x_test, y_test) = train, held_out
    torch.manual_seed(seed)
    mean, std = y_train.mean(0), y_train.std(0)
    augmenter = ObservationAugment(AugmentConfig(kind=augment), {"image": {"shape": tuple(x_train.shape[1:]), "kind": "rgb"}})
    image_shape = augmenter.network_obs_meta["image"]["shape"]
    net = nn.Sequential(ImageEncoder(image_shape, VisionConfig(pool=pool)), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-6)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = augmenter({"image": (images.float() / 255)[:, None]})["image"][:, 0]
        return (x - 0.5) / 0.25

    start = time.perf_counter()
    net.train(), augmenter.train()
    for _ in range(steps):
        index = torch.randint(0, len(x_train), (64,))
        loss = (net(prepare(x_train[index])) - (y_train[index] - mean) / std).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval(), augmenter.eval()
    with torch.no_grad():
        errors = [(torch.cat([net(prepare(x[i:i + 256])) for i in range(0, len(x), 256)]) * std + mean - y).abs().mean(0) * 100
                  for x, y in ((x_train, y_train), (x_test, y_test))]
    return errors[0].numpy(), errors[1].numpy(), time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="grid,spatial_softmax,flatten", help="pooling options of the conv encoder")
    ap.add_argument("--augment", default="none", help="none | shift | crop (policy.augment.kind)")
    ap.add_argument("--size", type=int, default=84, help="image size (the task's is 84)")
    ap.add_argument("--camera", default="corner2")
    ap.add_argument("--train-episodes", type=int, default=45)
    ap.add_argument("--test-episodes", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1500, help="training steps of batch 64")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train = expert_frames(range(args.train_episodes), args.size, args.camera)
    held_out = expert_frames(range(1_000_000, 1_000_000 + args.test_episodes), args.size, args.camera)
    print(f"{len(train[0])} training frames ({args.train_episodes} episodes), {len(held_out[0])} held-out frames; "
          f"{args.size}x{args.size} {args.camera}, augment {args.augment}; mean absolute error in cm ({', '.join(LABELS)})")
    print(f"label spread on held-out frames (SD, cm): {np.round(held_out[1].std(0).numpy() * 100, 2)}")
    slope, spread, dot = goal_pixel_scale(args.size, args.camera, range(1_000_000, 1_000_000 + args.test_episodes))
    print(f"the goal in the frame: {np.round(np.abs(slope).max(axis=1), 3)} px per cm of goal x / goal y (largest image axis), "
          f"its placements span {spread[0]:.0f} x {spread[1]:.0f} px, the dot covers at most {dot} px")
    for pool in args.variants.split(","):
        on_train, on_test, seconds = probe(pool, args.augment, train, held_out, args.steps, args.seed)
        print(f"conv encoder, pool {pool:16s} train {np.round(on_train, 2)}  held-out {np.round(on_test, 2)}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
