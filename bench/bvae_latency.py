"""BVAE inference latency on this CPU: `select_action` at batch 1 (target: under 1 ms).

    OMP_WAIT_POLICY=PASSIVE python bench/bvae_latency.py [--policy bvae] [--image-size 84] [--iters 1000] [--rounds 5]

Builds the policy from `conf/policy/<policy>.yaml` for the Meta-World image observation (an
`image` of 3 x S x S plus the 4-dim `agent_pos`, 4-dim action), fits its normalizer on random
data, and times, under `torch.inference_mode`, with 1 and 2 torch threads:
  - `select_action`: one env step as the env gives it (uint8 HWC numpy image, float32 numpy
    agent_pos) -> a numpy action, the whole robot-facing path (checks, conversion, history, queue);
  - `network`: `_predict_action_chunk` on prepared tensors (normalize, encoder mean, unnormalize).
Each case runs `--rounds` rounds of `--iters` calls, the cases interleaved round by round, so a
burst of load on this shared machine hits every case alike. Prints, per case, the median over the
rounds of each round's p50 / p99 (and the range of the round p50s) in milliseconds, and a JSON line
last (with the 1-minute load average: on a shared machine the figures grow with it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from il_policies import make_policy  # noqa: E402


def build(policy: str, image_size: int):
    cfg = OmegaConf.load(REPO / "conf" / "policy" / f"{policy}.yaml")
    if cfg.get("upsample_sizes") is not None and image_size != 224:
        cfg.upsample_sizes = None  # the original's sizes end at 224
    meta = {"obs": {"image": {"shape": (3, image_size, image_size), "kind": "rgb"}, "agent_pos": {"shape": (4,), "kind": "low_dim"}},
            "action": {"shape": (4,)}}
    model = make_policy(cfg, meta).eval()
    rng = np.random.default_rng(0)
    model.normalizer.fit({"image": rng.integers(0, 256, (64, image_size, image_size, 3), dtype=np.uint8),
                          "agent_pos": rng.normal(size=(64, 4)), "action": rng.normal(size=(64, 4))})
    return model


def timed(fn, iters: int) -> np.ndarray:
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times * 1e3


def summarize(rounds: list[np.ndarray]) -> dict[str, float]:
    p50s = [float(np.percentile(r, 50)) for r in rounds]
    return {"p50_ms": float(np.median(p50s)), "p99_ms": float(np.median([np.percentile(r, 99) for r in rounds])),
            "p10_ms": float(np.median([np.percentile(r, 10) for r in rounds])), "round_p50_min_ms": min(p50s),
            "round_p50_max_ms": max(p50s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="bvae", help="a conf/policy yaml with the conv VAE encoder (bvae, bvae_original, bc_conv_vae, vae_nn)")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--iters", type=int, default=1000, help="calls per round and case")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    model = build(args.policy, args.image_size)
    rng = np.random.default_rng(1)
    step = {"image": rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8),
            "agent_pos": rng.normal(size=4).astype(np.float32)}
    prepared = {"image": torch.rand(1, 1, 3, args.image_size, args.image_size), "agent_pos": torch.randn(1, 1, 4)}
    params = sum(p.numel() for p in model.parameters())
    encoder = model.obs_encoder if hasattr(model, "obs_encoder") else model.vae
    encoder_params = sum(p.numel() for p in encoder.encoder.parameters())
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            def select():
                model.reset()
                return model.select_action(step)

            def network():
                return model._run_network(prepared)  # as select_action runs it (small ops on one thread)

            cases = {"select_action": select, "network": network}
            for fn in cases.values():
                timed(fn, 200)  # warm-up
            rounds = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    rounds[name].append(timed(fn, args.iters))
            for name in cases:
                stats = summarize(rounds[name])
                results.append({"case": name, "threads": threads, **stats})
                print(f"{args.policy} {args.image_size}x{args.image_size} {name:13s} threads={threads}: "
                      f"p50 {stats['p50_ms']:.3f} ms  p99 {stats['p99_ms']:.3f} ms  (p10 {stats['p10_ms']:.3f} ms; "
                      f"round p50s {stats['round_p50_min_ms']:.3f}-{stats['round_p50_max_ms']:.3f} ms)")
    # The machine may be shared: the load average says how much the figures above are inflated.
    print(json.dumps({"policy": args.policy, "image_size": args.image_size, "parameters": params, "load_avg_1m": os.getloadavg()[0],
                      "encoder_parameters": encoder_params, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
