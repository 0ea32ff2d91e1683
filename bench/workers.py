"""What the benchmarks share: worker subprocesses driven over JSON lines, and the machine's description.

A benchmark script started with `--worker ARGS...` builds the object to time and answers one JSON
command per line (`serve`); the driver starts such workers (`Worker`) and calls them in turn, so that
every case runs in a process of its own and all of them see the same machine load.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Worker:
    """`python SCRIPT --worker *args` as a subprocess; `worker(cmd, **kw)` -> its JSON answer."""

    def __init__(self, script: str, *args: str, python: str = sys.executable, env: dict | None = None):
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **(env or {})}
        self.args = args
        self.proc = subprocess.Popen([python, os.path.abspath(script), "--worker", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.args} died (rc={self.proc.wait()})")
        return json.loads(line)

    def __call__(self, cmd: str, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def timed(fn, n: int) -> list[float]:
    """Seconds of each of `n` calls of `fn`."""
    import time

    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class PolicyTimings:
    """What every worker of ours times: `self.policies[variant]` answering `self.obs()` (batch 1)."""

    def infer(self, variant, n):
        policy = self.policies[variant]

        def call():
            policy.reset()
            policy.select_action(self.obs())
        return timed(call, n)

    def queue(self, variant, n):
        policy = self.policies[variant]
        policy.reset()
        policy.select_action(self.obs())
        return timed(lambda: policy.select_action(self.obs()), n)

    def peak(self):
        return {"gflops": round(matmul_peak_gflops(self.torch), 1)}


class LeRobotWorker:
    """LeRobot's policy for one case of /work/shared/bench/peer_lerobot.py ("act_img", "diffusion_img"),
    its batches and its training step (non-fused AdamW, clipping at 10, as lerobot_train.update_policy),
    built and timed by peer_lerobot.py's own functions; run with the peer venv's interpreter."""

    def __init__(self, case: str):
        import torch

        sys.path.insert(0, os.environ.get("PEER_BENCH", "/work/shared/bench"))
        import peer_lerobot

        torch.manual_seed(0)
        self.P, self.torch, self.case = peer_lerobot, torch, case
        self.policy, self.cfg, lr, wd, *_ = peer_lerobot.build_case(case)
        self.optimizer = torch.optim.AdamW(self.policy.get_optim_params(), lr=lr, weight_decay=wd)

    def train(self, variant, n, size=8):
        policy, torch = self.policy, self.torch

        def step():
            batch = self.P.make_train_batch(self.cfg, size, True, self.case.split("_")[0])
            policy.train()
            loss, _ = policy.forward(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
            self.optimizer.step()
            self.optimizer.zero_grad()
            loss.item()
        return timed(step, n)

    def infer(self, variant, n):
        self.policy.eval()

        def call():
            self.policy.reset()
            self.policy.select_action(self.P.make_obs(True))
        return timed(call, n)

    def queue(self, variant, n):
        self.policy.eval()
        self.policy.reset()
        self.policy.select_action(self.P.make_obs(True))
        return timed(lambda: self.policy.select_action(self.P.make_obs(True)), n)

    def info(self):
        import lerobot

        return {"params": sum(p.numel() for p in self.policy.parameters()), "torch": self.torch.__version__,
                "lerobot": getattr(lerobot, "__version__", "?")}


def serve(worker) -> None:
    """The worker side: announce readiness, then answer `{"cmd": name, **kw}` lines with `worker.name(**kw)`."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        if name == "quit":
            break
        result = getattr(worker, name)(**cmd)
        print(json.dumps(result if isinstance(result, dict) else {"times": result}), flush=True)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """The median wall time of `repeats` calls of `fn`, after `warmup` untimed ones."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(torch) -> float:
    """The fp32 matmul peak now, at torch's thread count: the best of five 2048^2 products."""
    import time

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def copy_bandwidth_gbs(torch, megabytes: int = 1024) -> float:
    """Memory bandwidth now: bytes read plus written per second by the best of five copies of a 1 GB tensor."""
    import time

    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


# ---------------------------------------------------------------------------------------------------
# the side-by-side driver shared by the *_vs_lerobot benchmarks
# ---------------------------------------------------------------------------------------------------
def med_ms(xs):
    import statistics

    return round(statistics.median(xs) * 1000, 2) if xs else None


def alternate(workers: dict, jobs: dict, rounds: int, counts: dict, queue_n: int = 5, peak_worker: str = "torch"):
    """Drive `jobs` ({kind: [(worker name, variant), ...]}) for `rounds` rounds, `counts[kind]` calls per
    job per round, the order rotating every round (and reversed every other cycle) so that every job takes
    every place after every other; after each round, `queue_n` queue calls of every "infer" job. The
    fp32 matmul peak is measured by `peak_worker` at the start of each round.

    Returns (times {variant: {kind: [s, ...]}}, per_round {variant: {kind: [median per round]}}, peaks)."""
    import statistics

    variants = [v for js in jobs.values() for _, v in js]
    times = {v: {"train": [], "infer": [], "queue": []} for v in dict.fromkeys(variants)}
    per_round = {v: {"train": [], "infer": []} for v in times}
    peaks = []
    for r in range(rounds):
        peaks.append(workers[peak_worker]("peak")["gflops"])
        for kind, js in jobs.items():
            order = js[r % len(js):] + js[: r % len(js)]
            if (r // len(js)) % 2:
                order.reverse()
            for worker, variant in order:
                got = workers[worker](kind, variant=variant, n=counts[kind])["times"]
                times[variant][kind] += got
                per_round[variant][kind].append(statistics.median(got))
        if queue_n:
            for worker, variant in jobs.get("infer", []):
                times[variant]["queue"] += workers[worker]("queue", variant=variant, n=queue_n)["times"]
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{v} train {med_ms(t['train'])} infer {med_ms(t['infer'])} ms" for v, t in times.items()), file=sys.stderr)
    return times, per_round, peaks


def summarize(times: dict, per_round: dict, peak: float, nominal_gflop, baseline: str = "lerobot") -> dict:
    """Medians in ms, the fraction of the matmul peak (`nominal_gflop(variant, kind)` GFLOP per call, or
    `nominal_gflop[kind]` for every variant, over the time),
    and, against `baseline`, the ratio of medians and the paired ratio (within each round) [median, min, max]."""
    import statistics

    summary = {}
    for v, t in times.items():
        s = {"train_step_ms": med_ms(t["train"]), "model_call_ms": med_ms(t["infer"]), "queue_call_ms": med_ms(t["queue"])}
        for what, key in (("train", "train_step_ms"), ("infer", "model_call_ms")):
            gflop = nominal_gflop(v, what) if callable(nominal_gflop) else nominal_gflop.get(what)
            if s[key] and gflop:
                s[f"{what}_frac_of_peak"] = round(gflop / (s[key] / 1000) / peak, 3)
            if s[key] and v != baseline and baseline in times and times[baseline][what]:
                paired = [o / p for o, p in zip(per_round[v][what], per_round[baseline][what])]
                s[f"{what}_ratio"] = round(s[key] / (statistics.median(times[baseline][what]) * 1000), 3)
                s[f"{what}_ratio_paired"] = [round(statistics.median(paired), 3), round(min(paired), 3), round(max(paired), 3)]
        summary[v] = s
    return summary


def print_table(summary: dict, width: int = 13) -> None:
    """One row per variant: training step and model call (median, ratio to the baseline, % of peak), queue call."""
    print(f"{'':{width}}{'train step':>16}{'ratio':>30}{'% peak':>8}{'model call b1':>16}{'ratio':>30}{'% peak':>8}{'queue':>10}")
    for v, s in summary.items():
        def cell(what, key):
            if not s[key]:
                return f"{'-':>16}{'':>30}{'':>8}"
            ratio = f"{s[what + '_ratio']} ({s[what + '_ratio_paired'][0]} [{s[what + '_ratio_paired'][1]}, {s[what + '_ratio_paired'][2]}])" \
                if what + "_ratio" in s else ""
            peak = f"{100 * s[what + '_frac_of_peak']:>7.0f}%" if what + "_frac_of_peak" in s else f"{'':>8}"
            return f"{s[key]:>13} ms{ratio:>30}{peak}"
        queue = f"{s['queue_call_ms']:>7} ms" if s["queue_call_ms"] is not None else f"{'-':>10}"
        print(f"{v:{width}}{cell('train', 'train_step_ms')}{cell('infer', 'model_call_ms')}{queue}")
