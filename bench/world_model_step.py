"""What one training step of the latent_bc world model costs, against the 1 s target of issue 16.

    OMP_WAIT_POLICY=PASSIVE python bench/world_model_step.py [--batch 32] [--steps 16] [--size 64] [--threads 2]

A whole training step (the default latent_bc config: filter, dynamics, decoder, action head; forward,
backward, AdamW) on a batch of `--batch` windows of `--steps` frames of `--size`x`--size` images plus
a 4-dim low-dim state and 4-dim actions (metaworld_push_image's keys), random data at fitted
normalization. Beside it, in the same run: the same step without the decoder's context skips, and
BC's default training step on `--batch` x `--steps` single frames (the same frames through a plain
image encoder, no decoder). Prints medians, the ratios, the CPU model and
the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
from workers import cpu_model, matmul_peak_gflops, median_seconds

from il_policies import make_policy
from il_policies.policies.registry import make_config


def training_step(name: str, options: dict, meta: dict, batch: dict):
    policy = make_policy(make_config({"name": name, **options}), meta).train()
    policy.normalizer.fitted.fill_(True)
    policy.set_training_step(1000)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=True)

    def step():
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in policy.parameters())


def windows(batch: int, n_obs: int, n_actions: int, size: int) -> dict:
    return {"obs": {"image": torch.rand(batch, n_obs, 3, size, size), "agent_pos": torch.randn(batch, n_obs, 4)},
            "action": torch.randn(batch, n_actions, 4), "action_is_pad": torch.zeros(batch, n_actions, dtype=torch.bool)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {cpu_model()}; fp32 matmul peak {matmul_peak_gflops(torch):.0f} GFLOP/s at {args.threads} threads")
    meta = {"obs": {"image": {"shape": (3, args.size, args.size), "kind": "rgb"}, "agent_pos": {"shape": (4,), "kind": "low_dim"}},
            "action": {"shape": (4,)}}
    base = {"n_obs_steps": args.steps, "frame_size": args.size}
    horizon = make_config({"name": "latent_bc", **base}).action_window().horizon
    batch = windows(args.batch, args.steps, horizon, args.size)
    cases = {
        "latent_bc (default)": ("latent_bc", base, batch),
        "  without the decoder's context skips": ("latent_bc", {**base, "skip_context": False}, batch),
        f"bc on {args.batch * args.steps} single frames": ("bc", {}, windows(args.batch * args.steps, 1, 1, args.size)),
    }
    frames = args.batch * args.steps
    print(f"training step, batch {args.batch} x {args.steps}-step windows of {args.size}x{args.size} frames ({frames} frames), "
          f"median of {args.repeats}:")
    reference = None
    for label, (name, options, data) in cases.items():
        step, n_params = training_step(name, options, meta, data)
        seconds = median_seconds(step, args.repeats)
        reference = reference or seconds
        print(f"  {label:45s} {seconds:6.3f} s  {frames / seconds:7.0f} frames/s  x{seconds / reference:4.2f} of latent_bc  "
              f"({n_params / 1e6:.2f} M parameters)")
    print(f"target (issue 16): <= 1 s per latent_bc step: {'met' if reference <= 1.0 else 'NOT met'} ({reference:.3f} s)")


if __name__ == "__main__":
    main()
