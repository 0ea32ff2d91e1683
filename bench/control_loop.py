"""Deadline misses of a 50 Hz control loop, synchronous against asynchronous chunk execution.

    OMP_WAIT_POLICY=PASSIVE python bench/control_loop.py [--policy act] [--backends torch,onnxruntime] [--steps 2000] [--rate 50]

The policy is built as in `bench/robot_latency.py` (its default config, random weights, Meta-World
push image shapes: an 84x84 camera + 4-dim proprioception; ACT: chunks of 100, all executed). For
each backend, in a process of its own, `run_control_loop` runs `--steps` steps at `--rate` Hz with
a fresh random observation every step, once synchronously (`select_action`: the network runs
whenever the queue is empty, inside the step) and once asynchronously (`asynchronous=True`: a
ChunkExecutor computes the next chunk in a background thread, threshold from the measured
latency). Reported: deadline misses (all, and after the first step, whose chunk every mode must
wait for), the p99 of the whole step, the steps that waited for a chunk, and the inference
latency; with the CPU model and the fp32 matmul peak measured in the same run, and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from robot_latency import LatencyWorker, robot_observation
from workers import Worker, cpu_model, serve


class LoopWorker(LatencyWorker):
    def loop(self, asynchronous: bool, steps: int, rate: float, blend: str = "linear") -> dict:
        from il_policies.robot import run_control_loop

        observations = [robot_observation(self.shape_meta, self.rng) for _ in range(32)]
        counter = iter(range(10**9))
        report = run_control_loop(self.policy, lambda: observations[next(counter) % len(observations)], lambda action: None,
                                  rate_hz=rate, n_steps=steps, asynchronous=asynchronous, warm_start=True,
                                  **({"blend": blend} if asynchronous else {}))
        return {"misses": report.deadline_misses, "misses_after_first": sum(1 for i in report.missed_steps if i > 0),
                "step_p99_ms": report.step_p99_ms, "select_p50_ms": report.latency_p50_ms, "select_p99_ms": report.latency_p99_ms,
                "stalls": report.stalls}

    def inference(self, n: int = 20) -> dict:
        import time

        times = []
        for _ in range(n):
            obs = robot_observation(self.shape_meta, self.rng)
            self.policy.reset()
            start = time.perf_counter()
            self.policy.predict_action_chunk(obs)
            times.append(time.perf_counter() - start)
        return {"p50_ms": float(np.median(times) * 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="act")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blend", default="linear")
    args = parser.parse_args()
    if args.worker:
        policy, backend, shapes, threads = args.worker
        return serve(LoopWorker(policy, backend, shapes, int(threads)))
    results, peaks = {}, []
    for backend in args.backends.split(","):
        worker = Worker(__file__, args.policy, backend, "image", str(args.threads))
        peaks.append(worker("peak")["gflops"])
        inference = worker("inference")["p50_ms"]
        for asynchronous in (False, True):
            got = worker("loop", asynchronous=asynchronous, steps=args.steps, rate=args.rate, blend=args.blend)
            results[(backend, asynchronous)] = {**got, "inference_ms": inference}
            print(f"{backend} {'asynchronous' if asynchronous else 'synchronous'}: {got}", file=sys.stderr)
        worker.close()
    print(f"# {args.policy} at {args.rate:g} Hz for {args.steps} steps (period {1000 / args.rate:g} ms), image shapes, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {cpu_model()}, fp32 matmul "
          f"peak {np.median(peaks):.0f} GFLOP/s\n")
    print("| backend | execution | chunk inference p50 (ms) | deadline misses | misses after the first step | whole step p99 (ms) | steps that waited for a chunk |")
    print("|---|---|---|---|---|---|---|")
    for (backend, asynchronous), r in results.items():
        print(f"| {backend} | {'asynchronous (' + args.blend + ')' if asynchronous else 'synchronous'} | {r['inference_ms']:.1f} | "
              f"{r['misses']} | {r['misses_after_first']} | {r['step_p99_ms']:.2f} | {r['stalls'] if asynchronous else '-'} |")
    print(json.dumps({"bench": "control_loop", "cpu": cpu_model(), "matmul_peak_gflops": peaks, "policy": args.policy,
                      "rate_hz": args.rate, "steps": args.steps, "threads": args.threads,
                      "results": {f"{b}/{'async' if a else 'sync'}": r for (b, a), r in results.items()}}))


if __name__ == "__main__":
    main()
