"""LeRobotDataset import: conversion speed, decoder choice, and a check against LeRobot's own writer.

    python bench/lerobot_import.py                       # (a) speed: 50 episodes, 2 cameras 96x96, v3.0
    python bench/lerobot_import.py --decoders            # PyAV vs torchcodec, sequential decode of one mp4
    python bench/lerobot_import.py --peer-python /work/peer-venv/bin/python
                                                         # (b) LeRobotDataset.create/add_frame/save_episode
                                                         #     in that venv, converted here and compared

The synthetic datasets come from tests/lerobot_fixtures.py.  Target for (a): >= 1,000 frames/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1's encoder banner: errors only

import av  # noqa: E402
import numpy as np  # noqa: E402
from av.video.reformatter import VideoReformatter  # noqa: E402

import tests.lerobot_fixtures as fx  # noqa: E402
from il_policies.data.lerobot_import import convert_lerobot  # noqa: E402
from workers import cpu_model  # noqa: E402  (bench/workers.py)

TARGET_FPS = 1000


def bench_conversion(workdir: Path, episodes: int, length: int, codecs: list[str], repeats: int) -> None:
    for codec in codecs:
        fx.CODEC = codec
        src = workdir / f"synthetic_{codec}"
        t0 = time.perf_counter()
        fx.write_lerobot(src, version="v3.0", lengths=(length,) * episodes, size=96, episodes_per_file=episodes)
        written = time.perf_counter() - t0
        frames = episodes * length
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            store = convert_lerobot(src, workdir / "out.zarr", overwrite=True)
            best = min(best, time.perf_counter() - t0)
        assert store.n_steps == frames
        rate = frames / best
        print(f"conversion  codec {codec:10s} {episodes} episodes x {length} frames, 2 cameras 96x96 (v3.0, one file): "
              f"best of {repeats} {best:.2f} s = {rate:,.0f} frames/s "
              f"({'meets' if rate >= TARGET_FPS else 'BELOW'} the {TARGET_FPS:,} target); writing it took {written:.1f} s")


def bench_decoders(workdir: Path, n_frames: int, codecs: list[str], repeats: int) -> None:
    """Decode every frame of one 96x96 mp4, front to back, to uint8 HWC arrays."""
    rng = np.random.default_rng(0)
    # smooth random images (not flat colours): a realistic amount of work for the decoder
    base = rng.integers(0, 256, (n_frames // 50 + 1, 12, 12, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2).repeat(50, axis=0)[:n_frames]
    for codec in codecs:
        fx.CODEC = codec
        path = workdir / f"decode_{codec}.mp4"
        fx.encode_mp4(path, images, fx.FPS)

        def pyav(threads, reuse):
            to_rgb = VideoReformatter()
            with av.open(str(path)) as c:
                s = c.streams.video[0]
                if threads:
                    s.thread_type = "AUTO"
                if reuse:  # what the importer does
                    return sum(to_rgb.reformat(f, format="rgb24").to_ndarray().shape[0] > 0 for f in c.decode(s))
                return sum(f.to_ndarray(format="rgb24").shape[0] > 0 for f in c.decode(s))

        results = {"pyav to_ndarray(rgb24)": lambda: pyav(False, False),
                   "pyav reused reformatter": lambda: pyav(False, True),
                   "pyav reused reformatter + AUTO": lambda: pyav(True, True)}
        try:
            from torchcodec.decoders import VideoDecoder

            def torchcodec(threads):
                dec = VideoDecoder(str(path), device="cpu", dimension_order="NHWC", seek_mode="approximate",
                                   num_ffmpeg_threads=threads)
                return sum(dec.get_frames_in_range(i, min(i + 256, len(dec))).data.shape[0]
                           for i in range(0, len(dec), 256))
            results["torchcodec (1 thread)"] = lambda: torchcodec(1)
            results["torchcodec (auto threads)"] = lambda: torchcodec(0)
        except Exception as e:  # not installed, or its FFmpeg libraries are missing
            print(f"decoders    torchcodec unavailable: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
        for name, fn in results.items():
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                got = fn()
                best = min(best, time.perf_counter() - t0)
            assert got == n_frames, (name, got)
            print(f"decoders    codec {codec:10s} {name:28s} {n_frames} frames 96x96: {n_frames / best:,.0f} frames/s")


PEER_SCRIPT = textwrap.dedent('''
    import sys, numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    root = sys.argv[1]
    with np.load(sys.argv[2]) as f:
        npz = {k: f[k] for k in f.files}
    n_eps, size = int(npz["n_eps"]), int(npz["size"])
    cam = {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]}
    features = {"observation.state": {"dtype": "float32", "shape": (4,), "names": ["a", "b", "c", "d"]},
                "observation.images.top": cam, "observation.images.wrist": dict(cam),
                "observation.images.side": {"dtype": "image", "shape": (size, size, 3),
                                            "names": ["height", "width", "channels"]},
                "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]}}
    ds = LeRobotDataset.create("local/peer_toy", fps=10, features=features, root=root, robot_type="toy_arm")
    for ep in range(n_eps):
        for t in range(len(npz[f"state_{ep}"])):
            ds.add_frame({"observation.state": npz[f"state_{ep}"][t], "action": npz[f"action_{ep}"][t],
                          "observation.images.top": npz[f"top_{ep}"][t], "observation.images.wrist": npz[f"wrist_{ep}"][t],
                          "observation.images.side": npz[f"side_{ep}"][t], "task": str(npz[f"task_{ep}"])})
        ds.save_episode(parallel_encoding=False)
    ds.finalize()
    print("lerobot", __import__("lerobot").__version__, "wrote", root)
''')


def bench_peer(workdir: Path, peer_python: str) -> bool:
    lengths, size = (12, 7, 20), 96
    tasks = ("pick up the cube", "pick up the cube", "stack the cubes")
    rng = np.random.default_rng(1)
    data = {"n_eps": len(lengths), "size": size}
    for ep, T in enumerate(lengths):
        data[f"state_{ep}"] = rng.standard_normal((T, 4)).astype(np.float32)
        data[f"action_{ep}"] = rng.uniform(-1, 1, (T, 2)).astype(np.float32)
        for cam, name in enumerate(("top", "wrist", "side")):
            data[f"{name}_{ep}"] = np.ascontiguousarray(fx.frames(ep, T, cam, size))
        data[f"task_{ep}"] = tasks[ep]
    np.savez(workdir / "peer_input.npz", **data)
    (workdir / "peer_write.py").write_text(PEER_SCRIPT)
    root = workdir / "peer_toy"
    t0 = time.perf_counter()
    r = subprocess.run([peer_python, str(workdir / "peer_write.py"), str(root), str(workdir / "peer_input.npz")],
                       capture_output=True, text=True, cwd=workdir)
    if r.returncode != 0:
        print(f"peer        LeRobot's writer failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        return False
    info = json.loads((root / "meta/info.json").read_text())
    n_videos = len(list((root / "videos/observation.images.top").rglob("*.mp4")))
    n_data = len(list((root / "data").rglob("*.parquet")))
    print(f"peer        {r.stdout.strip().splitlines()[-1]} in {time.perf_counter() - t0:.1f} s: codebase_version "
          f"{info['codebase_version']}, video codec {info['features']['observation.images.top'].get('info', {}).get('video.codec')}, "
          f"{len(lengths)} episodes in {n_data} data file(s) and {n_videos} video file(s) per camera")
    store = convert_lerobot(root, workdir / "peer.zarr", overwrite=True)
    problems = []
    if store.episode_lengths.tolist() != list(lengths):
        problems.append(f"episode lengths {store.episode_lengths.tolist()} != {list(lengths)}")
    worst = 0
    for ep, T in enumerate(lengths):
        got = store.episode(ep)
        for key, name in (("state", "state"), ("action", "action")):
            if not np.array_equal(got[key], data[f"{name}_{ep}"]):
                problems.append(f"episode {ep} {key} differs")
        if not np.array_equal(got["image_side"], data[f"side_{ep}"]):
            problems.append(f"episode {ep} image_side (PNG) differs")
        for cam, name in enumerate(("top", "wrist")):
            images = got[f"image_{name}"]
            for t in range(T):
                if fx.identify(images[t], dict(enumerate(lengths)), cam) != (ep, t):
                    problems.append(f"episode {ep} image_{name} frame {t} is another frame")
            worst = max(worst, int(np.abs(images.astype(int) - data[f"{name}_{ep}"].astype(int)).max()))
    if store.task != "peer_toy" or store.provenance["tasks"] != sorted(set(tasks), key=tasks.index):
        problems.append(f"task {store.task!r} / tasks {store.provenance['tasks']}")
    print(f"peer        converted {store.n_episodes} episodes, {store.n_steps} frames, keys {sorted(store.keys)}; "
          f"state/action/PNG exact, video frames all identified, max abs pixel error {worst}: "
          f"{'MATCH' if not problems else 'MISMATCH: ' + '; '.join(problems[:5])}")
    return not problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--length", type=int, default=100, help="frames per episode (lerobot/pusht averages 124)")
    p.add_argument("--codecs", default="mpeg4,libsvtav1,libx264", help="encoders to try (skipped if absent)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoders", action="store_true", help="also compare PyAV and torchcodec")
    p.add_argument("--peer-python", help="python of a venv with lerobot 0.6.x: check against its writer")
    a = p.parse_args()
    codecs = [c for c in a.codecs.split(",") if c in av.codecs_available]
    print(f"cpu         {cpu_model()}, {os.cpu_count()} cores; PyAV {av.__version__}, encoders tried: {', '.join(codecs)}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        bench_conversion(Path(tmp), a.episodes, a.length, codecs, a.repeats)
        if a.decoders:
            bench_decoders(Path(tmp), 2000, codecs, a.repeats)
        if a.peer_python:
            ok = bench_peer(Path(tmp), a.peer_python)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
