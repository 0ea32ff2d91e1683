"""CPU threads for batch-1 inference: large products on every thread, everything else on one.

With OpenMP's passive wait policy an idle worker thread sleeps, and waking it costs ~50-70 µs in a
VM here: more than a LayerNorm over 11 tokens takes on one thread (69 µs on two, 4.5 µs on one;
an add over 100 x 512 values: 72 vs 7 µs). A batch-1 network runs a few hundred such small ops
and a few dozen products that do gain from a second thread (ACT's 100-row feed-forward matmuls
and ResNet convolutions: 1.3-2x). So inference runs inside `small_ops_on_one_thread()`, and the
products worth it ask for the caller's threads back with `wide()`; both are no-ops outside it,
with one thread, or with autograd on (training keeps every thread for everything).

`torch.set_num_threads` costs ~0.1 µs, so the switches are free next to what they save. The state
is thread-local: each server worker thread has its own.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def small_ops_on_one_thread():
    """Run the block on one thread, except for what `wide()` marks as worth every thread."""
    threads = torch.get_num_threads()
    if threads == 1 or torch.is_grad_enabled() or getattr(_state, "threads", None) is not None:
        yield
        return
    _state.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _state.threads = None


@contextlib.contextmanager
def wide(worth_it: bool = True):
    """Inside `small_ops_on_one_thread()` and when `worth_it`: the caller's thread count for this block
    (a large product)."""
    threads = None if not worth_it or torch.compiler.is_compiling() else getattr(_state, "threads", None)
    if threads is None:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


__all__ = ["small_ops_on_one_thread", "wide"]
