"""Camera frames on disk: size and decode rate of each image codec against Blosc zstd.

    OMP_WAIT_POLICY=PASSIVE python bench/image_codecs.py [--frames 1500]

Three sources of frames: MuJoCo's renders from the generated stores (metaworld_push_image, 84x84;
aloha_transfer_cube_image, 96x96: flat shading, no sensor noise) and camera-like synthetic frames
(bench/synthetic_frames.py, 96x96, with sensor noise as a real camera). For each codec the frames
are written as `TrajectoryStore.create` lays a camera key out (Blosc zstd chunks of ~2 MB, or one
encoded image per chunk inside ~2 MB shards), then read back whole; one thread throughout (zarr's
pool and Blosc's), median of 3 reads. Prints bytes per frame, the compression ratio against the
raw frames, encode and decode frames per second, the PSNR of lossy codecs, the CPU model and the
fp32 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from synthetic_frames import episode
from workers import REPO, cpu_model, matmul_peak_gflops

from il_policies.data.codecs import parse_image_codec
from il_policies.data.layout import key_layout
from il_policies.data.schema import KeySpec
from il_policies.data.store import TrajectoryStore

CODECS = ["blosc", "jpeg:95", "jpeg:90", "jpegxl:90", "jpegxl:lossless", "avif:90", "webp:90", "webp:lossless", "png", "qoi"]


def sources(frames: int) -> dict[str, np.ndarray]:
    out = {}
    for name in ("metaworld_push_image", "aloha_transfer_cube_image"):
        path = REPO / "datasets" / f"{name}.zarr"
        if path.exists():
            images = TrajectoryStore.open(path).load(["image"])["image"]
            out[f"{name} (MuJoCo)"] = images[np.linspace(0, len(images) - 1, frames).astype(int)]
    out["synthetic camera (noise)"] = np.concatenate([episode(seed, 200, 96)["image"] for seed in range(-(-frames // 200))])[:frames]
    return out


def measure(frames: np.ndarray, codec_text: str) -> dict:
    spec = KeySpec(frames.shape[1:], "uint8", "rgb")
    with tempfile.TemporaryDirectory() as folder:
        array = zarr.create_array(folder, shape=frames.shape, dtype="uint8", fill_value=0,
                                  **key_layout(spec, parse_image_codec(codec_text)))
        start = time.perf_counter()
        array[:] = frames
        encode = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.name != "zarr.json")
        reads = []
        for _ in range(3):
            reopened = zarr.open_array(folder, mode="r")
            start = time.perf_counter()
            decoded = reopened[:]
            reads.append(time.perf_counter() - start)
    error = np.mean((decoded.astype(np.float64) - frames) ** 2)
    return {"bytes_per_frame": size / len(frames), "ratio": frames.nbytes / size, "encode_fps": len(frames) / encode,
            "decode_fps": len(frames) / float(np.median(reads)), "psnr": None if error == 0 else 10 * np.log10(255**2 / error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1})
    numcodecs.blosc.set_nthreads(1)
    print(f"CPU: {cpu_model()}; fp32 matmul peak {matmul_peak_gflops(torch):.0f} GFLOP/s at 1 thread; {args.frames} frames a source\n")
    print("| frames | codec | bytes / frame | ratio to raw | encode (frames/s) | decode (frames/s) | PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for name, frames in sources(args.frames).items():
        for codec in CODECS:
            r = measure(frames, codec)
            psnr = "lossless" if r["psnr"] is None else f"{r['psnr']:.1f}"
            print(f"| {name} | {codec} | {r['bytes_per_frame']:.0f} | {r['ratio']:.1f} | {r['encode_fps']:.0f} | "
                  f"{r['decode_fps']:.0f} | {psnr} |", flush=True)


if __name__ == "__main__":
    main()
