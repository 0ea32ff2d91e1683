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
