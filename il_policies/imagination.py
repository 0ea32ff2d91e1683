"""Imagined futures of a world-model policy (`latent_bc`) on held-out episodes, scored frame by frame.

For every window of `n_context + n_predict` steps of a held-out episode (starts `stride` apart), the
model filters the first `n_context` frames, then predicts `n_predict` steps open loop from the
recorded actions (`LatentBCPolicy.imagine`). Each predicted frame is scored against the recorded one
at the model's resolution by PSNR and SSIM (torchmetrics), beside the copy-the-last-frame baseline
(the last context frame held still): the curves per prediction step are what `eval/imagine.py`
plots and writes to metrics.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from il_policies.data.dataset import prepare_batch
from il_policies.data.sampler import split_episodes
from il_policies.data.store import TrajectoryStore


def held_out_episodes(payload: dict, store: TrajectoryStore) -> np.ndarray:
    """The episodes a checkpoint's run held out (its `data.val_ratio`, `seed` and `data.max_train_episodes`)."""
    cfg = OmegaConf.create(payload["config_yaml"])
    return split_episodes(store.n_episodes, cfg.data.val_ratio, cfg.seed, cfg.data.max_train_episodes)[1]


@dataclass
class ImaginationResult:
    psnr: np.ndarray  # (windows, n_predict), dB
    ssim: np.ndarray
    copy_last_psnr: np.ndarray
    copy_last_ssim: np.ndarray
    windows: list[tuple[int, int]] = field(default_factory=list)  # (episode, first step)
    frames: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (true, imagined) uint8 (n, S, S, 3), first windows

    def summary(self) -> dict:
        curve = lambda x: [round(float(v), 4) for v in x.mean(axis=0)]  # noqa: E731
        psnr, copy = self.psnr.mean(axis=0), self.copy_last_psnr.mean(axis=0)
        return {
            "n_windows": len(self.windows),
            "psnr": curve(self.psnr), "ssim": curve(self.ssim),
            "copy_last_psnr": curve(self.copy_last_psnr), "copy_last_ssim": curve(self.copy_last_ssim),
            "psnr_gain_db": [round(float(v), 4) for v in psnr - copy],
            "beats_copy_last_at_every_step": bool((psnr > copy).all()),
        }


def _scores(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, n, 3, S, S)` pairs in [0, 1] -> PSNR and SSIM, each `(B, n)`."""
    flat_p, flat_t = predicted.flatten(0, 1), truth.flatten(0, 1)
    psnr = peak_signal_noise_ratio(flat_p, flat_t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(flat_p, flat_t, data_range=1.0, reduction="none")
    return psnr.reshape(predicted.shape[:2]), ssim.reshape(predicted.shape[:2])


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def imagine_episodes(policy, store: TrajectoryStore, episodes, n_context: int, n_predict: int, stride: int | None = None,
                     batch_size: int = 16, keep_frames: int = 4) -> ImaginationResult:
    """Score `policy`'s open-loop predictions on every window of `episodes` (see the module docstring)."""
    if not policy.rgb_keys:
        raise ValueError(f"policy {policy.name!r} sees no camera: imagination scores images")
    if n_context < 1 or n_predict < 1:
        raise ValueError(f"n_context and n_predict must be >= 1, got {n_context} and {n_predict}")
    policy.eval()
    stride = stride or n_predict
    length = n_context + n_predict
    starts = []
    data = {}
    for episode in episodes:
        data[int(episode)] = arrays = store.episode(int(episode))
        n_steps = len(arrays["action"])
        if n_steps < length:
            raise ValueError(f"episode {episode} of {store.path} has {n_steps} steps, fewer than n_context + n_predict = {length}")
        starts += [(int(episode), s) for s in range(0, n_steps - length + 1, stride)]
    scores, result_frames = [], []
    for lo in range(0, len(starts), batch_size):
        chunk = starts[lo : lo + batch_size]
        obs = {key: np.stack([data[e][key][s : s + length] for e, s in chunk]) for key in policy.obs_keys}
        actions = np.stack([data[e]["action"][s + n_context - 1 : s + length - 1] for e, s in chunk])
        batch = prepare_batch({"obs": obs, "action": actions}, policy.shape_meta, policy.device)
        context = {key: value[:, :n_context] for key, value in batch["obs"].items()}
        imagined = policy.imagine(context, batch["action"])
        truth = policy.display(policy.frames({k: v[:, n_context:] for k, v in batch["obs"].items()})[0])
        copy_last = imagined["last_context"][:, None].expand_as(truth)
        scores.append((*_scores(imagined["image"], truth), *_scores(copy_last, truth)))
        for i in range(min(len(chunk), keep_frames - len(result_frames))):
            result_frames.append((_to_uint8(truth[i]), _to_uint8(imagined["image"][i])))
    psnr, ssim, copy_psnr, copy_ssim = (torch.cat(column).cpu().numpy() for column in zip(*scores))
    return ImaginationResult(psnr, ssim, copy_psnr, copy_ssim, starts, result_frames)


def imagination_metrics(policy, store: TrajectoryStore, episodes, n_context: int = 5, n_predict: int = 20, stride: int = 5) -> dict[str, float]:
    """The Workspace's end-of-run hook (`eval.loss_terms`): PSNR and SSIM per prediction step k on the
    held-out episodes long enough, as `imagine/psnr_k`, `imagine/ssim_k`, `imagine/copy_last_psnr_k`,
    and the smallest gain over copying the last frame, `imagine/psnr_gain_min`. {} without a camera."""
    long_enough = [e for e in episodes if store.episode_lengths[int(e)] >= n_context + n_predict]
    if not policy.rgb_keys or not long_enough:
        return {}
    summary = imagine_episodes(policy, store, long_enough, n_context, n_predict, stride, keep_frames=0).summary()
    metrics = {"imagine/psnr_gain_min": min(summary["psnr_gain_db"])}
    for name in ("psnr", "ssim", "copy_last_psnr"):
        metrics |= {f"imagine/{name}_{k + 1}": value for k, value in enumerate(summary[name])}
    return metrics


def side_by_side_frames(frames: list[tuple[np.ndarray, np.ndarray]], pad: int = 2) -> list[np.ndarray]:
    """(true, imagined) sequences -> one frame per prediction step: each window's true frame above
    its imagined one, windows side by side (for a GIF / mp4)."""
    out = []
    for t in range(frames[0][0].shape[0]):
        columns = [np.pad(np.concatenate([true[t], np.full((pad, *true.shape[2:]), 255, np.uint8), imagined[t]]),
                          ((0, 0), (0, pad), (0, 0)), constant_values=255) for true, imagined in frames]
        out.append(np.concatenate(columns, axis=1))
    return out


def plot_curves(summary: dict, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(summary["psnr"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        ax.plot(steps, summary[metric], marker="o", ms=3, label="imagined")
        ax.plot(steps, summary[f"copy_last_{metric}"], marker="s", ms=3, ls="--", label="copy last frame")
        ax.set_xlabel("steps after the context")
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or f"open-loop prediction over {summary['n_windows']} held-out windows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["ImaginationResult", "held_out_episodes", "imagination_metrics", "imagine_episodes", "plot_curves", "side_by_side_frames"]
