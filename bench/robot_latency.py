"""select_action latency of every registered policy, and the policy server's loopback round trip.

    OMP_WAIT_POLICY=PASSIVE python bench/robot_latency.py [--threads 2] [--calls 200] [--shapes image|state]

Each policy is built from its default config (`conf/policy/NAME.yaml`) for the observation shapes of
Meta-World push (image: 84x84 camera + 4-dim proprioception; state: 39 dims), with random weights
and a fitted identity-like normalizer. Reported per policy, at batch 1 from numpy observations:
model-running calls (the queue was empty: the network ran; forced by reset() before each call) and
queue calls (served from the action queue), p50 / p99 in ms; then the server round trip (client ->
websocket on 127.0.0.1 -> select_action -> reply) against the same policy called in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "image": {"obs": {"agent_pos": {"shape": (4,), "kind": "low_dim"}, "image": {"shape": (3, 84, 84), "kind": "rgb"}}, "action": {"shape": (4,)}},
    "state": {"obs": {"state": {"shape": (39,), "kind": "low_dim"}}, "action": {"shape": (4,)}},
}


def robot_observation(shape_meta, rng) -> dict[str, np.ndarray]:
    obs = {}
    for key, meta in shape_meta["obs"].items():
        if meta["kind"] == "rgb":
            c, h, w = meta["shape"]
            obs[key] = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
        else:
            obs[key] = rng.normal(size=meta["shape"])
    return obs


def build(name: str, shape_meta):
    from hydra import compose, initialize_config_dir

    from il_policies import make_policy

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"policy={name}"])
    policy = make_policy(cfg.policy, shape_meta).eval()
    policy.normalizer.fitted.fill_(True)
    return policy


def percentiles(values) -> tuple[float, float]:
    return float(np.percentile(values, 50) * 1e3), float(np.percentile(values, 99) * 1e3)


def time_policy(policy, shape_meta, calls: int, rng) -> dict:
    model, queue = [], []
    for i in range(calls + 3):
        obs = robot_observation(shape_meta, rng)
        policy.reset()
        start = time.perf_counter()
        policy.select_action(obs)
        if i >= 3:
            model.append(time.perf_counter() - start)
    policy.reset()
    for _ in range(calls):
        obs = robot_observation(shape_meta, rng)
        ran = not policy._action_queue
        start = time.perf_counter()
        policy.select_action(obs)
        (model if ran else queue).append(time.perf_counter() - start)
    return {"model": percentiles(model), "queue": percentiles(queue) if queue else None, "n_action_steps": policy.config.n_action_steps}


def time_server(policy, shape_meta, calls: int, rng) -> dict:
    from il_policies.serving.client import PolicyClient
    from il_policies.serving.server import PolicyServer

    server = PolicyServer(policy, port=0).start_in_thread()
    local, remote = [], []
    try:
        with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
            for i in range(calls + 3):
                obs = robot_observation(shape_meta, rng)
                client.reset()
                start = time.perf_counter()
                client.select_action(obs)
                if i >= 3:
                    remote.append(time.perf_counter() - start)
                policy.reset()
                start = time.perf_counter()
                policy.select_action(obs)
                if i >= 3:
                    local.append(time.perf_counter() - start)
    finally:
        server.stop()
    return {"local": percentiles(local), "remote": percentiles(remote)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="image")
    parser.add_argument("--policies", default=None, help="comma-separated; default: every registered policy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from il_policies import available_policies

    shape_meta = SHAPES[args.shapes]
    rng = np.random.default_rng(0)
    names = args.policies.split(",") if args.policies else available_policies()
    print(f"# select_action at batch 1, {args.shapes} observations, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, torch {torch.__version__}")
    print("| policy | n_action_steps | model-running call p50 / p99 (ms) | queue call p50 / p99 (ms) |")
    print("|---|---|---|---|")
    policies = {}
    for name in names:
        policies[name] = policy = build(name, shape_meta)
        figures = time_policy(policy, shape_meta, args.calls, rng)
        queue = "-" if figures["queue"] is None else "{:.3f} / {:.3f}".format(*figures["queue"])
        print(f"| {name} | {figures['n_action_steps']} | {figures['model'][0]:.3f} / {figures['model'][1]:.3f} | {queue} |", flush=True)
    print()
    print("| policy | in-process p50 / p99 (ms) | through the server on loopback p50 / p99 (ms) | round-trip overhead p50 (ms) |")
    print("|---|---|---|---|")
    for name, policy in policies.items():
        figures = time_server(policy, shape_meta, min(args.calls, 100), rng)
        overhead = figures["remote"][0] - figures["local"][0]
        print(f"| {name} | {figures['local'][0]:.3f} / {figures['local'][1]:.3f} | {figures['remote'][0]:.3f} / {figures['remote'][1]:.3f} | {overhead:.3f} |", flush=True)


if __name__ == "__main__":
    main()
