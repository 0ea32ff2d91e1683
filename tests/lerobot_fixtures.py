"""Small LeRobotDataset directories written from scratch (pyarrow + PyAV), in the v2.1 and v3.0 layouts.

Every value identifies where it came from: state/action encode (episode, frame), and each video frame
is one flat colour encoding (episode, frame, camera), which survives lossy compression, so a test can
tell which frame a decoded image is.  Used by tests/test_lerobot_import.py and bench/lerobot_import.py.
"""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FPS = 10
CAMERAS = ("top", "wrist")
LENGTHS = (5, 3, 6, 4)
TASKS = ("pick up the cube",)
GAP_FRAMES = 2  # v3 files leave this many empty frame slots between episodes, so time != row number
CODEC = "mpeg4"  # in every FFmpeg build and fast; flat colours survive it


def state(ep: int, T: int) -> np.ndarray:
    return (ep * 100 + np.arange(T)[:, None] + np.array([0.0, 0.25, 0.5, 0.75])).astype(np.float32)


def action(ep: int, T: int) -> np.ndarray:
    return (-(ep * 100 + np.arange(T))[:, None] * np.array([1.0, 0.5])).astype(np.float32)


def gripper(ep: int, T: int) -> np.ndarray:
    return (ep + np.arange(T) / 10).astype(np.float32)


def colour(ep: int, t: int, cam: int) -> np.ndarray:
    """Flat RGB colour of frame t of episode ep on camera cam, in steps of 16 (far apart after YUV420);
    unique for t < 56, ep < 7, cam < 3."""
    return np.array([16 + 16 * (t % 14), 24 + 32 * (ep % 7), 32 + 80 * cam + 16 * (t // 14 % 4)], np.uint8)


def frames(ep: int, T: int, cam: int, size: int) -> np.ndarray:
    return np.broadcast_to(np.stack([colour(ep, t, cam) for t in range(T)])[:, None, None, :], (T, size, size, 3))


def identify(image: np.ndarray, ep_lengths: dict[int, int], cam: int) -> tuple[int, int]:
    """The (episode, frame) whose colour is nearest to the image's mean colour."""
    mean = image.reshape(-1, 3).mean(axis=0)
    best = min(((ep, t) for ep, T in ep_lengths.items() for t in range(T)),
               key=lambda et: np.abs(colour(et[0], et[1], cam) - mean).sum())
    return best


def encode_mp4(path: Path, images: np.ndarray, fps: int, slots=None) -> None:
    """Write images as an mp4; frame i is shown at time slots[i] / fps (default i / fps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = images.shape[2], images.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.bit_rate = 4_000_000  # near-lossless for these tiny frames
        for i, image in enumerate(images):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = int(slots[i]) if slots is not None else i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _features(size: int, png_camera: bool) -> dict:
    cam = {"dtype": "video", "shape": [size, size, 3], "names": ["height", "width", "channels"],
           "info": {"video.fps": FPS, "video.codec": CODEC, "video.pix_fmt": "yuv420p", "video.is_depth_map": False}}
    features = {"observation.state": {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "w"]},
                "observation.gripper": {"dtype": "float32", "shape": [1], "names": None},
                **{f"observation.images.{c}": dict(cam) for c in CAMERAS},
                "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
                "next.done": {"dtype": "bool", "shape": [1], "names": None},
                "timestamp": {"dtype": "float32", "shape": [1], "names": None},
                "frame_index": {"dtype": "int64", "shape": [1], "names": None},
                "episode_index": {"dtype": "int64", "shape": [1], "names": None},
                "index": {"dtype": "int64", "shape": [1], "names": None},
                "task_index": {"dtype": "int64", "shape": [1], "names": None}}
    if png_camera:
        features["observation.images.side"] = {"dtype": "image", "shape": [size, size, 3],
                                               "names": ["height", "width", "channels"]}
    return features


def _table(ep: int, T: int, first_index: int, task_index: int, size: int, png_camera: bool) -> pa.Table:
    columns = {
        "observation.state": pa.array(list(state(ep, T)), type=pa.list_(pa.float32(), 4)),  # fixed-size list
        "observation.gripper": pa.array(gripper(ep, T), type=pa.float32()),  # shape (1,): a scalar column
        "action": pa.array([list(a) for a in action(ep, T)], type=pa.list_(pa.float32())),
        "next.done": pa.array(np.arange(T) == T - 1),
        "timestamp": pa.array(np.arange(T, dtype=np.float32) / FPS),
        "frame_index": pa.array(np.arange(T, dtype=np.int64)),
        "episode_index": pa.array(np.full(T, ep, np.int64)),
        "index": pa.array(first_index + np.arange(T, dtype=np.int64)),
        "task_index": pa.array(np.full(T, task_index, np.int64)),
    }
    if png_camera:
        side = frames(ep, T, 2, size)
        columns["observation.images.side"] = pa.array([{"bytes": png(side[t]), "path": None} for t in range(T)],
                                                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table(columns)


def write_lerobot(root: Path, version: str = "v3.0", lengths=LENGTHS, tasks=TASKS, size: int = 32,
                  png_camera: bool = False, episodes_per_file: int = 3, listed_lengths: dict | None = None,
                  video_lengths: dict | None = None) -> Path:
    """A LeRobotDataset at `root`: episode i has lengths[i] frames and task tasks[i % len(tasks)].
    listed_lengths / video_lengths override, per episode, the length in the episodes metadata and
    the number of frames encoded in the videos (to make broken datasets)."""
    listed_lengths, video_lengths = listed_lengths or {}, video_lengths or {}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    features = _features(size, png_camera)
    info = {"codebase_version": version, "robot_type": "toy_arm", "fps": FPS,
            "total_episodes": len(lengths), "total_frames": int(sum(lengths)), "total_tasks": len(tasks),
            "chunks_size": 1000, "splits": {"train": f"0:{len(lengths)}"}, "features": features}
    ep_rows, tables, first = [], [], 0
    for ep, T in enumerate(lengths):
        task_index = ep % len(tasks)
        tables.append(_table(ep, T, first, task_index, size, png_camera))
        ep_rows.append({"episode_index": ep, "tasks": [tasks[task_index]], "length": listed_lengths.get(ep, T),
                        "dataset_from_index": first, "dataset_to_index": first + T})
        first += T
    if version == "v3.0":
        info.update(data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
                    data_files_size_in_mb=100, video_files_size_in_mb=200)
        _write_v3(root, info, lengths, tables, ep_rows, tasks, size, episodes_per_file, video_lengths)
    else:
        info.update(total_chunks=1, total_videos=len(lengths) * len(CAMERAS),
                    data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                    video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
        _write_v2(root, info, lengths, tables, ep_rows, tasks, size, video_lengths)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    return root


def _write_v2(root, info, lengths, tables, ep_rows, tasks, size, video_lengths) -> None:
    for ep, T in enumerate(lengths):
        path = root / info["data_path"].format(episode_chunk=0, episode_index=ep)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(tables[ep], path)
        for cam, name in enumerate(CAMERAS):
            key = f"observation.images.{name}"
            encode_mp4(root / info["video_path"].format(episode_chunk=0, video_key=key, episode_index=ep),
                       frames(ep, video_lengths.get(ep, T), cam, size), FPS)
    lines = [{k: r[k] for k in ("episode_index", "tasks", "length")} for r in ep_rows]
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(tasks)))
    stats = [{"episode_index": r["episode_index"], "stats": {"action": {"min": [0.0, 0.0]}}} for r in lines]
    (root / "meta/episodes_stats.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stats))


def _write_v3(root, info, lengths, tables, ep_rows, tasks, size, episodes_per_file, video_lengths) -> None:
    files = [list(range(i, min(i + episodes_per_file, len(lengths)))) for i in range(0, len(lengths), episodes_per_file)]
    for file_index, eps in enumerate(files):
        path = root / info["data_path"].format(chunk_index=0, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables([tables[ep] for ep in eps]), path)
        for cam, name in enumerate(CAMERAS):
            key = f"observation.images.{name}"
            images, slots, slot = [], [], 0
            for ep in eps:
                n = video_lengths.get(ep, lengths[ep])
                images.append(frames(ep, n, cam, size))
                slots.extend(range(slot, slot + n))
                ep_rows[ep].update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": file_index,
                                    f"videos/{key}/from_timestamp": slot / FPS,
                                    f"videos/{key}/to_timestamp": (slot + n) / FPS})
                slot += n + GAP_FRAMES
            encode_mp4(root / info["video_path"].format(video_key=key, chunk_index=0, file_index=file_index),
                       np.concatenate(images), FPS, slots)
        for ep in eps:
            ep_rows[ep].update({"data/chunk_index": 0, "data/file_index": file_index,
                                "stats/action/mean": [0.0, 0.0], "meta/episodes/chunk_index": 0,
                                "meta/episodes/file_index": 0})
    episodes_dir = root / "meta/episodes/chunk-000"
    episodes_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(ep_rows), episodes_dir / "file-000.parquet")
    pq.write_table(pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": list(tasks)}),
                   root / "meta/tasks.parquet")
    (root / "meta/stats.json").write_text(json.dumps({"action": {"min": [0.0, 0.0]}}))
