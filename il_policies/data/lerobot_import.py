"""Convert a local LeRobotDataset directory (v2.0, v2.1 or v3.0) into a trajectory store.

No hub access and no `lerobot` or `datasets` import: pyarrow reads the Parquet files, PyAV the
videos; file paths come from meta/info.json's data_path / video_path templates.

    v2.x  meta/episodes.jsonl (episode_index, tasks, length), meta/tasks.jsonl; one parquet per
          episode and one mp4 per camera per episode (episode_chunk = episode_index // chunks_size)
    v3.0  meta/episodes/chunk-*/file-*.parquet (a row per episode: tasks, length, data/chunk_index,
          data/file_index, videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}),
          meta/tasks.parquet; many episodes per data file (picked by episode_index) and per mp4
          (an episode is the window [from_timestamp, to_timestamp) of the file)

Key mapping (the other features, e.g. timestamp, index, next.*, integer features and depth videos,
are listed in provenance["skipped_features"])::

    observation.state            -> state          low_dim float32
    observation.images.<cam>     -> image_<cam>    rgb uint8 HWC: dtype "video" (the mp4) or
    observation.image            -> image          "image" (PNG bytes inside the parquet)
    observation.<name> (float)   -> <name>         low_dim float32, dots become underscores
    action                       -> action         action float32

One store episode per LeRobot episode, in episode_index order; `fps` is the dataset's, `task` the
one task string of the converted episodes (else the folder's name); provenance: source, dir,
codebase_version, robot_type, episodes, tasks (all of the dataset), episode_tasks, features
(store key -> LeRobot feature), skipped_features, decoder.

Checks: an episode's parquet rows must number its `length`, and each camera must have one frame
per row in the episode's window, shown within half a frame period of from_timestamp + the row's
timestamp (frames are picked by time, not by position).  Every problem is a one-sentence
StoreError naming the file, the key and the episode.  Each video file is decoded once, in order.

Decoder: PyAV.  torchcodec 0.17 works with torch 2.14.1 and decodes 96x96 frames about 3x faster,
but needs the system's FFmpeg shared libraries, which pip cannot install (absent here and in CI);
PyAV's wheels bundle FFmpeg, AV1 included, and the conversion of 100-frame episodes stays above
1,000 frames/s (bench/lerobot_import.py --decoders; numbers in datasets/README.md).
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
from dataclasses import dataclass

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from av.video.reformatter import VideoReformatter
from PIL import Image

from il_policies.data.paths import built_aside, check_output_path
from il_policies.data.schema import KeySpec, StoreError, exc_text, first_nonfinite_row
from il_policies.data.store import TrajectoryStore

__all__ = ["SUPPORTED_VERSIONS", "convert_lerobot", "parse_episodes"]

APPEND_BATCH_STEPS = 2000

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
FLOAT_DTYPES = ("float16", "float32", "float64")


def parse_episodes(spec: str) -> list[int]:
    """'0-49' or '3,5,7-9' -> sorted unique episode indices."""
    out = set()
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise StoreError(f"episode selection {spec!r}: {part.strip()!r} is not an index or an increasing range like 0-49.")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(out)


@dataclass
class _Episode:
    index: int
    length: int
    tasks: list[str]
    listing: str  # the metadata file that lists it
    data_file: str  # paths relative to the dataset directory
    videos: dict  # feature -> (mp4 path, from_timestamp, to_timestamp)


def _read_json(src: pathlib.Path, rel: str, err, lines: bool = False):
    """A JSON object, or (lines=True) the list of objects of a .jsonl file."""
    try:
        text = (src / rel).read_text()
    except FileNotFoundError:
        raise err(f"{rel} is missing") from None
    try:
        values = [json.loads(t) for t in (text.splitlines() if lines else [text]) if t.strip() or not lines]
    except ValueError as e:
        raise err(f"{rel} is not valid JSON ({exc_text(e)})") from None
    if not all(isinstance(v, dict) for v in values):
        raise err(f"{rel} holds {'a line that is' if lines else 'a value that is'} not a JSON object")
    return values if lines else values[0]


def _read_parquet(src: pathlib.Path, rel: str, columns: list[str] | None, err, what: str = "") -> pa.Table:
    """`columns` of a parquet file (all if None; `what` prefixes the errors, e.g. 'episode 3: data file')."""
    label = f"{what} {rel}".strip()
    if not (src / rel).is_file():
        raise err(f"{label} is missing")
    try:
        if columns is not None:
            names = pq.read_schema(src / rel).names
            if missing := [c for c in columns if c not in names]:
                raise err(f"{label} has no column {missing[0]!r}")
        return pq.read_table(src / rel, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise err(f"{label} cannot be read as Parquet ({exc_text(e)})") from None


def _fill(info: dict, key: str, err, **values) -> str:
    try:
        return info[key].format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise err(f"meta/info.json key {key!r} is a template this layout cannot fill ({exc_text(e)})") from None


def _episodes_v2(src, info, video_features, err) -> tuple[list[_Episode], list[str]]:
    listing, chunks_size, episodes = "meta/episodes.jsonl", int(info.get("chunks_size") or 1000), []
    for n, row in enumerate(_read_json(src, listing, err, lines=True), 1):
        if any(isinstance(row.get(k), bool) or not isinstance(row.get(k), int) for k in ("episode_index", "length")):
            raise err(f"{listing} entry {n} has no integer 'episode_index' and 'length'")
        index, chunk = row["episode_index"], row["episode_index"] // chunks_size
        videos = {f: (_fill(info, "video_path", err, episode_chunk=chunk, video_key=f, episode_index=index), 0.0, math.inf)
                  for f in video_features}
        data_file = _fill(info, "data_path", err, episode_chunk=chunk, episode_index=index)
        episodes.append(_Episode(index, row["length"], [str(t) for t in row.get("tasks") or []], listing, data_file, videos))
    rows = _read_json(src, "meta/tasks.jsonl", err, lines=True) if (src / "meta/tasks.jsonl").exists() else []
    return episodes, [str(r.get("task")) for r in sorted(rows, key=lambda r: r.get("task_index") or 0)]


def _episodes_v3(src, info, video_features, err) -> tuple[list[_Episode], list[str]]:
    files = sorted((src / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise err("meta/episodes/chunk-*/file-*.parquet is missing")
    needed = ["episode_index", "length", "tasks", "data/chunk_index", "data/file_index"]
    needed += [f"videos/{f}/{c}" for f in video_features for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    episodes = []
    for path in files:
        listing = path.relative_to(src).as_posix()
        for row in _read_parquet(src, listing, needed, err).to_pylist():
            if empty := [c for c in needed if row[c] is None]:
                raise err(f"{listing} episode {row['episode_index']} has no value in column {empty[0]!r}")
            videos = {f: (_fill(info, "video_path", err, video_key=f, chunk_index=row[f"videos/{f}/chunk_index"],
                                file_index=row[f"videos/{f}/file_index"]),
                          float(row[f"videos/{f}/from_timestamp"]), float(row[f"videos/{f}/to_timestamp"]))
                      for f in video_features}
            data_file = _fill(info, "data_path", err, chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            episodes.append(_Episode(int(row["episode_index"]), int(row["length"]), [str(t) for t in row["tasks"]],
                                     listing, data_file, videos))
    if not (src / "meta/tasks.parquet").exists():
        return episodes, []
    rows = _read_parquet(src, "meta/tasks.parquet", None, err).to_pylist()
    column = next((c for c in ("task", "__index_level_0__") if rows and c in rows[0]), None)  # pandas writes its index
    if rows and column is None:
        raise err("meta/tasks.parquet has no column 'task'")
    return episodes, [str(r[column]) for r in sorted(rows, key=lambda r: r.get("task_index") or 0)]


def _plan_keys(features: dict, err) -> tuple[dict[str, tuple[str, KeySpec]], list[str]]:
    """{store key: (LeRobot feature, spec)} and the features left out."""
    plan, skipped = {}, []
    for feature, ft in features.items():
        if not isinstance(ft, dict) or not isinstance(ft.get("shape"), (list, tuple)):
            raise err(f"meta/info.json feature {feature!r} has no 'shape' list")
        dtype, shape = ft.get("dtype"), tuple(int(s) for s in ft["shape"])
        name = feature.removeprefix("observation.")
        if dtype in ("video", "image"):
            if len(shape) == 3 and [str(n).lower() for n in ft.get("names") or []][:1] in (["channel"], ["channels"]):
                shape = (shape[1], shape[2], shape[0])  # described channel-first (some v2.0 datasets)
            if (ft.get("info") or {}).get("video.is_depth_map") or len(shape) != 3 or shape[2] != 3:
                skipped.append(feature)
                continue
            key = "image_" + name.removeprefix("images.") if name.startswith("images.") else name
            spec = KeySpec(shape, "uint8", "rgb")
        elif dtype in FLOAT_DTYPES and (feature == "action" or feature.startswith("observation.")):
            key = "state" if feature == "observation.state" else name
            spec = KeySpec(shape, "float32", "action" if feature == "action" else "low_dim")
        else:
            skipped.append(feature)
            continue
        if (why := spec.problem()) is not None:
            raise err(f"meta/info.json feature {feature!r} {why}")
        key = key.replace(".", "_")
        if key in plan:
            raise err(f"meta/info.json features {plan[key][0]!r} and {feature!r} would both become store key {key!r}")
        plan[key] = (feature, spec)
    if "action" not in plan:
        raise err("meta/info.json has no float 'action' feature")
    return plan, skipped


def _numbers(table: pa.Table, feature: str, spec: KeySpec, err) -> np.ndarray:
    """A numeric column as (N, *shape) float32: scalars for shape (1,), (nested) lists otherwise."""
    arr = table.column(feature).combine_chunks()
    if arr.null_count:
        raise err(f"has a null value in column {feature!r}")
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    values = arr.to_numpy(zero_copy_only=False)
    if values.size != len(table) * math.prod(spec.shape) or values.dtype.kind not in "biuf":
        raise err(f"column {feature!r} does not hold {len(table)} rows of {list(spec.shape)} numbers")
    with np.errstate(over="ignore", invalid="ignore"):
        values = values.astype(np.float32).reshape(len(table), *spec.shape)
    if (row := first_nonfinite_row(values)) is not None:
        raise err(f"column {feature!r} holds NaN or inf (or overflows float32) at frame {row}")
    return values


def _pngs(table: pa.Table, feature: str, spec: KeySpec, err) -> np.ndarray:
    images = np.empty((len(table), *spec.shape), np.uint8)
    for row, cell in enumerate(table.column(feature).to_pylist()):
        if not isinstance(cell, dict) or not cell.get("bytes"):
            raise err(f"column {feature!r} frame {row} has no embedded image bytes")
        try:
            images[row] = np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
        except Exception as e:  # PIL's errors, or a size that differs from info.json's
            raise err(f"column {feature!r} frame {row} is not a readable {list(spec.shape)} image ({exc_text(e)})") from None
    return images


class _VideoReader:
    """One camera's frames, decoded front to back: each window() hands over the frames of one time
    window and leaves the decoder where it stopped, so the episodes of a v3 file cost one pass."""

    def __init__(self, half_period: float):
        self.half = half_period
        self.to_rgb = VideoReformatter()  # reused: frame.to_ndarray(format=...) builds a converter per frame
        self.path = self.container = self.frames = self.pending = None
        self.last_end = -math.inf  # frames before the end of the last window are gone

    def window(self, path: pathlib.Path, start: float, end: float) -> tuple[np.ndarray, list]:
        """(times, av frames) of the frames shown in [start, end), give or take half a frame period."""
        if path != self.path or start < self.last_end - 1e-6:  # a new file, or an earlier window: start over
            self.close()
            self.container = av.open(str(path))
            stream = self.container.streams.video[0]
            stream.thread_type = "AUTO"
            self.path, self.frames = path, self.container.decode(stream)
        times, frames = [], []
        while (frame := self.pending if self.pending is not None else next(self.frames, None)) is not None:
            self.pending = None
            if frame.time is not None and frame.time >= end - self.half:
                self.pending = frame  # the first frame of the next episode
                break
            if frame.time is not None and frame.time >= start - self.half:
                times.append(frame.time)
                frames.append(frame)
        self.last_end = end
        order = np.argsort(times, kind="stable")
        return np.asarray(times, np.float64)[order], [frames[i] for i in order]

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.path = self.container = self.frames = self.pending = None
        self.last_end = -math.inf


def _video_frames(reader: _VideoReader, src, ep: _Episode, feature: str, spec: KeySpec, row_times, err) -> np.ndarray:
    rel, start, end = ep.videos[feature]
    where = f"episode {ep.index} key {feature!r}: video {rel}"
    if not (src / rel).is_file():
        raise err(f"{where} is missing")
    try:
        times, frames = reader.window(src / rel, start, end)
    except (OSError, av.error.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise err(f"{where} cannot be decoded ({exc_text(e)})") from None
    if len(frames) != len(row_times):
        span = "in the file" if math.isinf(end) else f"between {start:.3f} s and {end:.3f} s"
        raise err(f"{where} has {len(frames)} frames {span} but the data table has {len(row_times)} rows")
    # same count, both in time order: row i is frame i, if that frame is shown at the row's time
    wanted = start + row_times
    if (late := np.flatnonzero(np.abs(times - wanted) >= reader.half)).size:
        r = int(late[0])
        raise err(f"{where} has no frame within half a frame period of row {r} (time {wanted[r]:.4f} s, "
                  f"frame {r} of the episode is at {times[r]:.4f} s)")
    out = np.empty((len(frames), *spec.shape), np.uint8)
    for row, frame in enumerate(frames):
        image = reader.to_rgb.reformat(frame, format="rgb24").to_ndarray()
        if image.shape != spec.shape:
            raise err(f"{where} has frames of shape {list(image.shape)} but meta/info.json says {list(spec.shape)}")
        out[row] = image
    return out


def _episode_rows(cache: dict, src, ep: _Episode, columns: list[str], err) -> pa.Table:
    """The rows of one episode in frame_index order; a v3 data file is read once for all its episodes."""
    if cache.get("file") != ep.data_file:
        names = set(pq.read_schema(src / ep.data_file).names) if (src / ep.data_file).is_file() else set()
        wanted = columns + [c for c in ("frame_index", "timestamp") if c in names]
        table = _read_parquet(src, ep.data_file, wanted, err, what=f"episode {ep.index}: data file")
        cache.update(file=ep.data_file, table=table, ids=table.column("episode_index").to_numpy())
    table = cache["table"].take(np.flatnonzero(cache["ids"] == ep.index))
    if "frame_index" in table.column_names:
        table = table.take(np.argsort(table.column("frame_index").to_numpy(), kind="stable"))
    if len(table) != ep.length:
        raise err(f"episode {ep.index}: data file {ep.data_file} has {len(table)} rows for it but {ep.listing} "
                  f"says its length is {ep.length}")
    return table


def _read_info(src: pathlib.Path, err) -> dict:
    info = _read_json(src, "meta/info.json", err)
    if info.get("codebase_version") not in SUPPORTED_VERSIONS:
        raise err(f"meta/info.json has codebase_version {info.get('codebase_version')!r}, "
                  f"this importer reads {', '.join(SUPPORTED_VERSIONS)}")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise err(f"meta/info.json key 'fps' is {fps!r}, not a positive number")
    for key, kind in (("features", dict), ("data_path", str)):
        if not isinstance(info.get(key), kind):
            raise err(f"meta/info.json key {key!r} is missing or not a {kind.__name__}")
    return info


def convert_lerobot(src_dir, out_path, *, episodes: list[int] | None = None, overwrite: bool = False,
                    image_codec: str | None = None) -> TrajectoryStore:
    """Write the episodes of LeRobotDataset directory `src_dir` (all, or the episode indices in
    `episodes`) to a new store at `out_path`; return it opened read-only.  The store is written
    aside and renamed into place, so a failed conversion leaves `out_path` as it was. `image_codec`
    stores the cameras as images per frame (e.g. "jpeg:95", `il_policies.data.codecs`)."""
    src = pathlib.Path(os.path.expanduser(str(src_dir))).absolute()
    out = pathlib.Path(out_path)

    def err(msg: str) -> StoreError:
        return StoreError(f"LeRobot dataset {src}: {msg}.")

    if not src.is_dir():
        raise err("does not exist" if not src.exists() else "is not a directory")
    check_output_path(out, overwrite)
    info = _read_info(src, err)
    fps, version = float(info["fps"]), info["codebase_version"]
    plan, skipped = _plan_keys(info["features"], err)
    video_features = [f for f, _ in plan.values() if info["features"][f]["dtype"] == "video"]
    if video_features and not isinstance(info.get("video_path"), str):
        raise err(f"meta/info.json key 'video_path' is missing but feature {video_features[0]!r} is a video")

    listed, all_tasks = (_episodes_v3 if version == "v3.0" else _episodes_v2)(src, info, video_features, err)
    by_index = {}
    for ep in listed:
        if by_index.setdefault(ep.index, ep) is not ep:
            raise err(f"{ep.listing} lists episode {ep.index} twice")
    chosen = sorted(by_index) if episodes is None else sorted(set(int(e) for e in episodes))
    if unknown := [e for e in chosen if e not in by_index]:
        raise err(f"has no episode {unknown[0]} (episodes {min(by_index, default=0)}-{max(by_index, default=-1)} are listed)")
    if not chosen:
        raise err("has no episodes to convert")
    episode_tasks = [by_index[e].tasks for e in chosen]
    distinct = sorted({t for ts in episode_tasks for t in ts})
    provenance = {"source": "lerobot", "dir": str(src), "codebase_version": version, "robot_type": info.get("robot_type"),
                  "episodes": chosen, "tasks": all_tasks or distinct, "episode_tasks": episode_tasks,
                  "features": {k: f for k, (f, _) in plan.items()}, "skipped_features": skipped,
                  "decoder": f"pyav {av.__version__}"}
    columns = ["episode_index"] + [f for f, _ in plan.values() if f not in video_features]
    readers = {f: _VideoReader(0.5 / fps) for f in video_features}
    cache: dict = {}
    try:
        with built_aside(out, overwrite) as tmp:
            store = TrajectoryStore.create(tmp, {k: spec for k, (_, spec) in plan.items()}, fps=fps,
                                           task=distinct[0] if len(distinct) == 1 else src.name, provenance=provenance,
                                           image_codec=image_codec)
            pending: list[dict] = []  # written a few thousand steps at a time: short episodes cost one write each otherwise
            for ep in (by_index[e] for e in chosen):
                table = _episode_rows(cache, src, ep, columns, err)
                row_times = (table.column("timestamp").to_numpy().astype(np.float64) if "timestamp" in table.column_names
                             else np.arange(len(table)) / fps)

                def table_err(msg, _where=f"episode {ep.index}: data file {ep.data_file}"):
                    return err(f"{_where} {msg}")

                episode = {}
                for key, (feature, spec) in plan.items():
                    if feature in readers:
                        episode[key] = _video_frames(readers[feature], src, ep, feature, spec, row_times, err)
                    else:
                        episode[key] = (_pngs if spec.kind == "rgb" else _numbers)(table, feature, spec, table_err)
                pending.append(episode)
                if sum(len(e["action"]) for e in pending) >= APPEND_BATCH_STEPS:
                    store.append_episodes(pending)
                    pending = []
            store.append_episodes(pending)
    finally:
        for reader in readers.values():
            reader.close()
    return TrajectoryStore.open(out, mode="r")
