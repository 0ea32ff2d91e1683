"""select_action latency of every registered policy with every inference backend, and the policy
server's loopback round trip.

    OMP_WAIT_POLICY=PASSIVE python bench/robot_latency.py [--threads 2] [--calls 200] [--rounds 5] [--shapes image|state]

Each policy is built from its default config (`policy=NAME`) for the observation shapes of Meta-World
push (image: 84x84 camera + 4-dim proprioception; state: 39 dims), with random weights and a
normalizer fitted on random data. Backends: `torch` (the reference network), `accel` (torch with the
speed layer's module swaps), `onnxruntime` and `openvino` (the exported network). Every (policy,
backend) runs in a process of its own (as on a robot: one runtime's thread pool per process), and
the processes are driven in turn, `--rounds` times, the order rotating, so that load hits every case
alike. Reported at batch 1 from numpy observations (uint8 HWC image): model-running calls (reset()
before each call: the network runs) and queue calls (served from the action queue), p50 / p99 in ms
over all rounds; then, for the torch and onnxruntime backends, the server round trip (client ->
websocket on 127.0.0.1 -> select_action -> reply) against the same policy called in-process.
Prints Markdown tables, the CPU model and the fp32 matmul peak measured in the same run, and a JSON
line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from workers import REPO, Worker, cpu_model, matmul_peak_gflops, serve

SHAPES = {
    "image": {"obs": {"agent_pos": {"shape": (4,), "kind": "low_dim"}, "image": {"shape": (3, 84, 84), "kind": "rgb"}},
              "action": {"shape": (4,)}},
    "state": {"obs": {"state": {"shape": (39,), "kind": "low_dim"}}, "action": {"shape": (4,)}},
}
BACKENDS = ("torch", "accel", "onnxruntime", "openvino")


def robot_observation(shape_meta, rng) -> dict[str, np.ndarray]:
    obs = {}
    for key, meta in shape_meta["obs"].items():
        if meta["kind"] == "rgb":
            c, h, w = meta["shape"]
            obs[key] = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
        else:
            obs[key] = rng.normal(size=meta["shape"])
    return obs


# ---- a worker: one policy with one backend ---------------------------------------------------------
class LatencyWorker:
    def __init__(self, policy: str, backend: str, shapes: str, threads: int):
        import torch
        from hydra import compose, initialize_config_dir

        import il_policies.training.config  # noqa: F401  (the structured configs)
        from il_policies import make_policy

        torch.set_num_threads(threads)
        self.torch, self.shape_meta = torch, SHAPES[shapes]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"policy={policy}"])
        torch.manual_seed(0)
        self.policy = make_policy(cfg.policy, self.shape_meta).eval()
        rng = np.random.default_rng(0)
        data = {k: np.stack([robot_observation(self.shape_meta, rng)[k] for _ in range(64)]) for k in self.shape_meta["obs"]}
        self.policy.normalizer.fit({**data, "action": rng.normal(size=(64, 4))})
        if backend == "accel":
            from il_policies.accel import accelerate

            accelerate(self.policy)
        elif backend != "torch":
            from il_policies.accel.backends import RUNTIMES, export_onnx

            path = export_onnx(self.policy, Path(tempfile.mkdtemp(prefix="latency_")) / "policy.onnx")
            self.policy.use_backend(RUNTIMES[backend](path, threads))
        self.rng = np.random.default_rng(1)
        self.calls(10)  # warm-up

    def calls(self, n: int) -> dict:
        model, queue = [], []
        for _ in range(n):
            obs = robot_observation(self.shape_meta, self.rng)
            self.policy.reset()
            start = time.perf_counter()
            self.policy.select_action(obs)
            model.append(time.perf_counter() - start)
        self.policy.reset()
        for _ in range(n):
            obs = robot_observation(self.shape_meta, self.rng)
            ran = not self.policy._action_queue
            start = time.perf_counter()
            self.policy.select_action(obs)
            (model if ran else queue).append(time.perf_counter() - start)
        return {"model": model, "queue": queue, "n_action_steps": self.policy.window.n_action_steps}

    def server(self, n: int) -> dict:
        from il_policies.serving.client import PolicyClient
        from il_policies.serving.server import PolicyServer

        server = PolicyServer(self.policy, port=0).start_in_thread()
        local, remote = [], []
        try:
            with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
                for i in range(n + 3):
                    obs = robot_observation(self.shape_meta, self.rng)
                    client.reset()
                    start = time.perf_counter()
                    client.select_action(obs)
                    remote.append(time.perf_counter() - start)
                    self.policy.reset()
                    start = time.perf_counter()
                    self.policy.select_action(obs)
                    local.append(time.perf_counter() - start)
        finally:
            server.stop()
        return {"local": local[3:], "remote": remote[3:]}

    def peak(self) -> dict:
        return {"gflops": matmul_peak_gflops(self.torch)}


def worker_main(argv) -> None:
    policy, backend, shapes, threads = argv
    serve(LatencyWorker(policy, backend, shapes, int(threads)))


def p50_p99(values) -> str:
    return f"{np.percentile(values, 50) * 1e3:.3f} / {np.percentile(values, 99) * 1e3:.3f}" if values else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="model-running calls per case, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="image")
    parser.add_argument("--policies", default=None, help="comma-separated; default: every registered policy")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    from il_policies import available_policies

    names = args.policies.split(",") if args.policies else available_policies()
    cases = [(name, backend) for name in names for backend in args.backends.split(",")]
    workers = {case: Worker(__file__, *case, args.shapes, str(args.threads)) for case in cases}
    results = {case: {"model": [], "queue": []} for case in cases}
    peaks = []
    per_round = max(1, args.calls // args.rounds)
    for r in range(args.rounds):
        peaks.append(workers[cases[0]]("peak")["gflops"])
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        for case in order:
            got = workers[case]("calls", n=per_round)
            results[case]["model"] += got["model"]
            results[case]["queue"] += got["queue"]
            results[case]["n_action_steps"] = got["n_action_steps"]
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"# select_action at batch 1, {args.shapes} observations (numpy, uint8 HWC image), {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {cpu_model()}, fp32 matmul peak "
          f"{np.median(peaks):.0f} GFLOP/s (per round {min(peaks):.0f}-{max(peaks):.0f})\n")
    print("| policy | backend | n_action_steps | model-running call p50 / p99 (ms) | queue call p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for (name, backend), figures in results.items():
        print(f"| {name} | {backend} | {figures['n_action_steps']} | {p50_p99(figures['model'])} | {p50_p99(figures['queue'])} |")
    servers = {}
    if not args.no_server:
        print("\n| policy | backend | in-process p50 / p99 (ms) | through the server on loopback p50 / p99 (ms) | round-trip overhead p50 (ms) |")
        print("|---|---|---|---|---|")
        for case in [c for c in cases if c[1] in ("torch", "onnxruntime")]:
            servers[case] = got = workers[case]("server", n=min(args.calls, 100))
            overhead = (np.percentile(got["remote"], 50) - np.percentile(got["local"], 50)) * 1e3
            print(f"| {case[0]} | {case[1]} | {p50_p99(got['local'])} | {p50_p99(got['remote'])} | {overhead:.3f} |", flush=True)
    for worker in workers.values():
        worker.close()
    print(json.dumps({"bench": "robot_latency", "cpu": cpu_model(), "matmul_peak_gflops": peaks, "threads": args.threads,
                      "shapes": args.shapes, "results": {f"{n}/{b}": {k: (np.percentile(v, [50, 99]) * 1e3).round(4).tolist()
                                                                       for k, v in r.items() if k != "n_action_steps" and v}
                                                          for (n, b), r in results.items()}}))


if __name__ == "__main__":
    main()
