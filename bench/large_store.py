"""Datasets larger than memory: a synthetic camera store of 200k frames, read lazily.

    python bench/large_store.py make [--frames 200000] [--size 96] [--out bench/data/large.zarr]
    OMP_WAIT_POLICY=PASSIVE python bench/large_store.py measure [--store bench/data/large.zarr]

`make` writes camera-like episodes of 200 steps (bench/synthetic_frames.py) with Blosc zstd, as the
generator does, two processes drawing the frames and this one appending them.

`measure`, with nothing else running:
1. the lazy loader: windows per second that `SequenceDataset.from_store(in_memory=False)` delivers
   through the DataLoader in the chunk-aligned order, in the windows of `train.py policy=bc` at
   batch 64, with 0 and 2 worker processes;
2. what training consumes: the windows per second of a default BC training step at the same batch
   (2 torch threads), measured in the same run;
3. the peak memory (train.py's RSS, and its process tree's PSS) of a BC training run on the store
   (`data.in_memory=auto`, which reads it lazily: it is larger than the 4 GiB budget), with 0 and
   2 loader workers;
4. object storage: the same loader (0 and 2 workers) over the store's first `--s3-frames` frames
   copied to a local S3-compatible server (moto, started here on loopback) and on local disk, and
   their ratios.
Prints a table, the CPU model and the fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from synthetic_frames import episode, keys
from workers import REPO, cpu_model, matmul_peak_gflops, median_seconds

from il_policies import make_policy
from il_policies.policies.registry import make_config
from il_policies.data.dataset import SequenceDataset, collate_batch
from il_policies.data.store import TrajectoryStore
from il_policies.training.distributed import GlobalBatchOrder

EPISODE = 200


def bc_window() -> dict:
    """The windows `train.py policy=bc` reads: its default config's action window."""
    window = make_config({"name": "bc"}).action_window()
    return dict(n_obs_steps=window.n_obs_steps, horizon=window.horizon, action_offset=window.start, val_ratio=0.01, seed=0)


def _episode(args):
    return episode(*args)


def make(out: Path, frames: int, size: int, codec: str | None) -> None:
    store = TrajectoryStore.create(out, keys(size), fps=30.0, task="synthetic_tabletop", overwrite=True,
                                   provenance={"generator": "bench/synthetic_frames.py", "frames": frames}, image_codec=codec)
    n = frames // EPISODE
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pending = []
        for i, ep in enumerate(pool.imap(_episode, [(seed, EPISODE, size) for seed in range(n)], chunksize=4)):
            pending.append(ep)
            if len(pending) == 20 or i == n - 1:
                store.append_episodes(pending, seeds=list(range(i + 1 - len(pending), i + 1)))
                pending = []
                print(f"\r{i + 1}/{n} episodes, {time.perf_counter() - start:.0f} s", end="", flush=True)
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"\n{out}: {store.n_steps} frames, {store.nbytes(store.keys) / 1e9:.2f} GB decoded, {disk / 1e9:.2f} GB on disk")


def loader_rate(path, workers: int, batches: int, batch: int = 64) -> float:
    """Windows per second the lazy loader delivers in the chunk-aligned order (after 5 warm-up batches)."""
    dataset = SequenceDataset.from_store(path, in_memory=False, cache_mb=256, **bc_window())
    order = GlobalBatchOrder(len(dataset), batch, seed=0, blocks=dataset.sample_blocks(), blocks_per_shuffle=16)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order.iter_from(0), collate_fn=collate_batch, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    it = iter(loader)
    for _ in range(5):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def training_rate(size: int, batch: int = 64) -> float:
    """Windows per second a default BC training step consumes at BC's image windows."""
    meta = {"obs": {"image": {"shape": (3, size, size), "kind": "rgb"}, "state": {"shape": (4,), "kind": "low_dim"}},
            "action": {"shape": (2,)}}
    policy = make_policy({"name": "bc"}, meta).train()
    n_obs, horizon = policy.config.n_obs_steps, policy.config.horizon
    data = {"obs": {"image": torch.rand(batch, n_obs, 3, size, size), "state": torch.randn(batch, n_obs, 4)},
            "action": torch.randn(batch, horizon, 2), "action_is_pad": torch.zeros(batch, horizon, dtype=torch.bool)}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=True)

    def step():
        loss, _ = policy.compute_loss(data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / median_seconds(step, repeats=10, warmup=3)


def peak_training_memory(path, steps: int, workers: int, out: Path) -> tuple[float, float, float]:
    """Peak memory (GB) of train.py sampled every 0.2 s: its own RSS, and its process tree's (with its
    loader workers) proportional set size, which counts the pages they share (torch's libraries,
    the forked parent's memory) once, where summed RSS would count them in every process; and the
    run's wall time."""
    command = [sys.executable, "train.py", "policy=bc", "task=dataset", f"task.dataset_path={path}", f"training.steps={steps}",
               "training.batch_size=64", "training.num_threads=2", "training.val_every=100000", "eval.n_episodes=0",
               "data.val_ratio=0.01", "data.batch_order=chunked", f"data.num_workers={workers}", "logger.mode=disabled",
               f"hydra.run.dir={out}"]
    start, peak_rss, peak_pss = time.perf_counter(), 0, 0
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak_rss = max(peak_rss, parent.memory_info().rss)
            peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in [parent, *parent.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"train.py failed: {proc.stderr.read()[-2000:]}")
    return peak_rss / 1e9, peak_pss / 1e9, time.perf_counter() - start


def s3_rates(store: Path, frames: int, batches: int, scratch: Path) -> dict[str, float]:
    """Lazy-loader rates from local disk and from moto's S3 server on loopback, on the same sub-store,
    with 0 and 2 loader workers."""
    source = TrajectoryStore.open(store)
    local = scratch / "s3_subset.zarr"
    subset = TrajectoryStore.create(local, source.keys, fps=source.fps, task=source.task, overwrite=True)
    for i in range(frames // EPISODE):
        subset.append_episode(source.episode(i), seed=i)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(local), "bench/subset.zarr", recursive=True)
        rates = {}
        for workers in (0, 2):
            on_disk, on_s3 = loader_rate(local, workers, batches), loader_rate("s3://bench/subset.zarr", workers, batches)
            rates |= {f"subset_local_windows_per_s_{workers}_workers": round(on_disk, 1),
                      f"subset_s3_windows_per_s_{workers}_workers": round(on_s3, 1),
                      f"s3_over_local_{workers}_workers": round(on_s3 / on_disk, 2)}
        return rates
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(args) -> None:
    torch.set_num_threads(2)
    store = TrajectoryStore.open(args.store)
    size = store.keys["image"].shape[0]
    result = {"cpu": cpu_model(), "matmul_peak_gflops": round(matmul_peak_gflops(torch)), "frames": store.n_steps,
              "decoded_gb": round(store.nbytes(store.keys) / 1e9, 2),
              "on_disk_gb": round(sum(f.stat().st_size for f in Path(args.store).rglob("*") if f.is_file()) / 1e9, 2),
              "stored": store.storage("image")}
    result["bc_step_windows_per_s"] = round(training_rate(size), 1)
    for workers in (0, 2):
        result[f"lazy_windows_per_s_{workers}_workers"] = round(loader_rate(args.store, workers, args.batches), 1)
    best = max(result["lazy_windows_per_s_0_workers"], result["lazy_windows_per_s_2_workers"])
    result["lazy_over_training"] = round(best / result["bc_step_windows_per_s"], 2)
    result["train_steps"] = args.train_steps
    for workers in (0, 2):
        run_dir = Path(args.scratch) / f"train_run_{workers}_workers"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run left there would resume instead of training
        rss, pss, wall = peak_training_memory(args.store, args.train_steps, workers, run_dir)
        result |= {f"train_peak_rss_gb_{workers}_workers": round(rss, 2), f"train_tree_peak_pss_gb_{workers}_workers": round(pss, 2),
                   f"train_wall_s_{workers}_workers": round(wall, 1)}
    result |= {"s3_frames": args.s3_frames, **s3_rates(Path(args.store), args.s3_frames, args.batches, Path(args.scratch))}
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["make", "measure"])
    parser.add_argument("--store", default=str(REPO / "bench/data/large.zarr"))
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--image-codec", default=None)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--s3-frames", type=int, default=20_000)
    parser.add_argument("--scratch", default="/tmp/large_store_bench")
    args = parser.parse_args()
    if args.what == "make":
        make(Path(args.store), args.frames, args.size, args.image_codec)
    else:
        measure(args)


if __name__ == "__main__":
    main()
