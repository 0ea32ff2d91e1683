"""How much of an observation can its action determine? A bound for BVAE's decoder D(a), by nearest neighbours.

    python bench/action_decodability.py [--store datasets/metaworld_push_image.zarr] [--train-episodes 8] [--seeds 0,1,2] [--per-pixel]

For each seed, the same episode split as `train.py seed=S data.max_train_episodes=N` (10 % held
out). Each held-out frame's observation is predicted as the mean observation of its k nearest
training frames by some input (its action, its action chunk, its proprioception), and the
prediction's MSE on each observation group (image: per-channel z-score of the training frames,
as BVAE's default normalization, or with `--per-pixel` per-pixel as `image_norm_per_pixel`, a
constant pixel keeping scale 1 as the normalizer does; low-dim keys: per-dimension z-score) is printed beside the MSE of
the training mean. The fraction explained, 1 - MSE / MSE(mean), is what a decoder fed that input
can hope for: when the action explains little of the image, D(a) has little to draw but the average
scene, whatever its training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from il_policies.data.sampler import split_episodes  # noqa: E402
from il_policies.data.store import TrajectoryStore  # noqa: E402


def chunks(values: np.ndarray, starts, ends, ids, horizon: int) -> np.ndarray:
    """Each frame's next `horizon` values (the last one repeated past the episode end), flattened."""
    out = []
    for i in ids:
        episode = values[starts[i] : ends[i]]
        padded = np.concatenate([episode, np.repeat(episode[-1:], horizon - 1, axis=0)])
        out.append(np.stack([padded[t : t + horizon].reshape(-1) for t in range(len(episode))]))
    return np.concatenate(out)


def knn_mean(train_x: np.ndarray, query_x: np.ndarray, train_y: np.ndarray, k: int) -> np.ndarray:
    distance = (query_x**2).sum(1)[:, None] - 2 * query_x @ train_x.T + (train_x**2).sum(1)[None]
    nearest = np.argsort(distance, axis=1)[:, :k]
    return train_y[nearest].mean(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(REPO / "datasets" / "metaworld_push_image.zarr"))
    parser.add_argument("--train-episodes", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--per-pixel", action="store_true", help="z-score each image pixel, as image_norm_per_pixel")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "action_decodability.json"))
    args = parser.parse_args()

    store = TrajectoryStore.open(args.store)
    image_key = next(k for k, spec in store.keys.items() if spec.kind == "rgb")
    low_keys = [k for k, spec in store.keys.items() if spec.kind == "low_dim"]
    data = store.load([image_key, "action", *low_keys])
    lengths = store.episode_lengths
    ends = np.cumsum(lengths)
    starts = ends - lengths
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        train_ids, val_ids = split_episodes(len(lengths), 0.1, seed, args.train_episodes)
        rows = lambda ids: np.concatenate([np.arange(starts[i], ends[i]) for i in ids])  # noqa: E731
        tr, va = rows(train_ids), rows(val_ids)

        def zscore(x, axis=0):
            return (x - x[tr].mean(axis)) / x[tr].std(axis).clip(1e-6)

        images = data[image_key].astype(np.float32) / 255.0
        if args.per_pixel:
            scale = images[tr].astype(np.float64).std(0)  # float64: a constant pixel's std is then exactly 0
            image = ((images - images[tr].mean(0)) / np.where(scale < 1e-6, 1.0, scale)).reshape(len(images), -1)
        else:
            channels = images[tr].reshape(-1, images.shape[-1])
            image = ((images - channels.mean(0)) / channels.std(0)).reshape(len(images), -1)
        low = zscore(np.concatenate([data[k].reshape(len(images), -1) for k in low_keys], axis=1))
        action = zscore(data["action"].reshape(len(images), -1))
        groups = {"image": image, "low_dim": low}
        inputs = {"action": (action[tr], action[va])}
        for horizon in (8, 32):
            scaled = chunks(action, starts, ends, train_ids, horizon), chunks(action, starts, ends, val_ids, horizon)
            inputs[f"action chunk of {horizon}"] = scaled
        inputs[f"proprioception ({', '.join(low_keys)})"] = (low[tr], low[va])
        row = {"seed": seed, "train_frames": len(tr), "held_out_frames": len(va), "mean": {}, "explained": {},
               "held_out_image_abs_z_p99.9": float(np.quantile(np.abs(image[va]), 0.999)),
               "held_out_image_abs_z_max": float(np.abs(image[va]).max())}
        for group, y in groups.items():
            row["mean"][group] = float(((y[tr].mean(0) - y[va]) ** 2).mean())
        for name, (x_train, x_val) in inputs.items():
            row["explained"][name] = {}
            for group, y in groups.items():
                mse = float(((knn_mean(x_train, x_val, y[tr], args.k) - y[va]) ** 2).mean())
                row["explained"][name][group] = 1.0 - mse / row["mean"][group]
        results.append(row)
        print(f"seed {seed}: {len(tr)} training frames, {len(va)} held out; MSE of the training mean: "
              + ", ".join(f"{g} {v:.4f}" for g, v in row["mean"].items())
              + f"; held-out image |z|: 99.9th percentile {row['held_out_image_abs_z_p99.9']:.1f}, max {row['held_out_image_abs_z_max']:.0f}")
        for name, explained in row["explained"].items():
            print(f"  {args.k}-NN from {name:38s} explained: " + "  ".join(f"{g} {v:+.3f}" for g, v in explained.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"store": args.store, "train_episodes": args.train_episodes, "k": args.k,
                                          "per_pixel": args.per_pixel, "seeds": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
