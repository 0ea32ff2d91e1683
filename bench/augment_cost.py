"""What image augmentation costs against the training step it feeds.

    OMP_WAIT_POLICY=PASSIVE python bench/augment_cost.py [--batch 64] [--size 84] [--repeats 30]

For each augmentation (crop 0.9, shift 4 px, crop + colour jitter 0.2) on a batch of `--batch`
`--size`x`--size` camera images with one observation step: the augmentation alone in train mode,
and a whole BC training step (default BC, images augmented, forward, backward, AdamW) at the same
batch. Prints medians in ms, the augmentation's share of the step, the CPU model and the fp32 matmul
peak measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
from workers import cpu_model, matmul_peak_gflops, median_seconds

from il_policies import make_policy
from il_policies.policies.config import AugmentConfig

CASES = {"crop": AugmentConfig("crop"), "shift": AugmentConfig("shift"), "crop+jitter": AugmentConfig("crop", color_jitter=0.2)}


def median_ms(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats, warmup=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"obs": {"image": {"shape": (3, args.size, args.size), "kind": "rgb"}, "agent_pos": {"shape": (4,), "kind": "low_dim"}},
            "action": {"shape": (4,)}}
    batch = {"obs": {"image": torch.rand(args.batch, 1, 3, args.size, args.size), "agent_pos": torch.randn(args.batch, 1, 4)},
             "action": torch.randn(args.batch, 1, 4), "action_is_pad": torch.zeros(args.batch, 1, dtype=torch.bool)}
    print(f"CPU: {cpu_model()}; fp32 matmul peak {matmul_peak_gflops(torch):.0f} GFLOP/s at {args.threads} threads")
    print(f"batch {args.batch} of {args.size}x{args.size} images\n")
    print("| augmentation | augmentation alone (ms) | BC training step (ms) | share of the step |")
    print("|---|---|---|---|")
    for name, config in CASES.items():
        torch.manual_seed(0)
        policy = make_policy({"name": "bc", "augment": config.__dict__}, meta).train()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, fused=True)

        def step():
            loss, _ = policy.compute_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        augment_ms = median_ms(lambda: policy.augment(batch["obs"]), args.repeats)
        step_ms = median_ms(step, args.repeats)
        print(f"| {name} | {augment_ms:.2f} | {step_ms:.1f} | {augment_ms / step_ms:.1%} |")


if __name__ == "__main__":
    main()
