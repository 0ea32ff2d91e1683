"""Running a policy in a fixed-rate control loop, with latency and deadline reporting.

    from il_policies import load_policy
    from il_policies.robot import run_control_loop

    policy = load_policy("best.pt")
    report = run_control_loop(policy, robot.get_observation, robot.send_action, rate_hz=policy.metadata["fps"] or 10, n_steps=500)
    print(report)   # p50/p99 latency of select_action, deadline misses
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoopReport:
    n_steps: int
    rate_hz: float
    latency_p50_ms: float  # select_action alone
    latency_p99_ms: float
    step_p99_ms: float  # observation + select_action + send
    deadline_misses: int  # steps whose work overran the period
    stalls: int = 0  # asynchronous: steps that waited for an inference (the first step of an episode does)
    missed_steps: tuple[int, ...] = ()  # which steps overran (0: the first)

    def __str__(self) -> str:
        return (
            f"{self.n_steps} steps at {self.rate_hz:g} Hz: select_action p50 {self.latency_p50_ms:.2f} ms, "
            f"p99 {self.latency_p99_ms:.2f} ms; whole step p99 {self.step_p99_ms:.2f} ms; {self.deadline_misses} deadline misses"
            + (f"; {self.stalls} steps waited for a chunk" if self.stalls else "")
        )


def run_control_loop(
    policy: Any,
    get_observation: Callable[[], dict],
    send_action: Callable[[np.ndarray], None],
    rate_hz: float,
    n_steps: int,
    reset: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    asynchronous: bool = False,
    warm_start: bool = False,
    **executor_options,
) -> LoopReport:
    """Call `send_action(policy.select_action(get_observation()))` every 1 / rate_hz seconds.

    A step that overruns its period counts as a deadline miss, and the schedule restarts from
    now instead of firing late steps back to back. `asynchronous=True` serves the actions through
    a `ChunkExecutor` (`il_policies.chunk_executor`; `executor_options` such as `blend`,
    `threshold`): the next chunk is computed in a background thread while the current one runs.
    `warm_start=True` runs one step before the schedule starts (untimed: the episode's first
    chunk, which any execution must wait for), then `n_steps` timed steps.
    """
    if rate_hz <= 0:
        raise ValueError(f"rate_hz must be positive, got {rate_hz}")
    if asynchronous:
        from il_policies.chunk_executor import ChunkExecutor

        with ChunkExecutor(policy, rate_hz=rate_hz, **executor_options) as executor:
            if reset:
                executor.reset()
            report = run_control_loop(executor, get_observation, send_action, rate_hz, n_steps, reset=False, clock=clock, sleep=sleep,
                                      warm_start=warm_start)
            return replace(report, stalls=executor.stalls)
    period = 1.0 / rate_hz
    if reset:
        policy.reset()
    if warm_start:
        send_action(policy.select_action(get_observation()))
    latencies, step_times, missed = [], [], []
    next_tick = clock()
    for index in range(n_steps):
        start = clock()
        observation = get_observation()
        before = clock()
        action = policy.select_action(observation)
        latencies.append(clock() - before)
        send_action(action)
        end = clock()
        step_times.append(end - start)
        next_tick += period
        if end > next_tick:
            missed.append(index)
            next_tick = end
        else:
            sleep(next_tick - end)
    ms = lambda values, q: float(np.percentile(values, q) * 1000.0) if values else 0.0  # noqa: E731
    return LoopReport(n_steps, rate_hz, ms(latencies, 50), ms(latencies, 99), ms(step_times, 99), len(missed), missed_steps=tuple(missed))
