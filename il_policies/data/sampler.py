"""Episode split and sequence-window index computation (numpy only).

Trajectories are stored ReplayBuffer-style: every key is one array with all
episodes concatenated along axis 0, and ``episode_ends[i]`` is the exclusive
global end index of episode ``i`` (so episode ``i`` spans
``[episode_ends[i-1], episode_ends[i])`` with ``episode_ends[-1] := 0``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_episodes", "episode_starts", "SequenceSampler"]


def split_episodes(
    n_episodes: int,
    val_ratio: float,
    seed: int,
    max_train_episodes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split whole episodes into sorted ``(train_ids, val_ids)`` (int64).

    A seeded permutation picks ``round(n_episodes * val_ratio)`` validation
    episodes (at least 1 when ``val_ratio > 0`` and there are 2+ episodes; never
    all of them, at least one episode always trains). ``max_train_episodes``
    then subsamples the remaining train episodes (seeded); the validation set
    does not depend on it.
    """
    n_episodes = int(n_episodes)
    if n_episodes < 1:
        raise ValueError(f"Cannot split {n_episodes} episodes: need at least 1 episode.")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must lie in [0, 1), got {val_ratio}.")
    n_val = int(round(n_episodes * val_ratio))
    if val_ratio > 0 and n_episodes > 1:
        n_val = max(n_val, 1)
    n_val = min(n_val, n_episodes - 1)

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_episodes)
    val_ids, train_ids = perm[:n_val], perm[n_val:]

    if max_train_episodes is not None:
        max_train_episodes = int(max_train_episodes)
        if max_train_episodes < 1:
            raise ValueError(f"max_train_episodes must be >= 1, got {max_train_episodes}.")
        if max_train_episodes > len(train_ids):
            raise ValueError(
                f"max_train_episodes={max_train_episodes} is more than the {len(train_ids)} train "
                f"episodes available ({n_episodes} episodes, {n_val} held out for validation)."
            )
        train_ids = rng.choice(train_ids, size=max_train_episodes, replace=False)

    return np.sort(train_ids).astype(np.int64), np.sort(val_ids).astype(np.int64)


def episode_starts(episode_ends: np.ndarray) -> np.ndarray:
    """Inclusive global start index of every episode."""
    ends = np.asarray(episode_ends, dtype=np.int64)
    return np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1]])


def _check_episode_ends(episode_ends) -> np.ndarray:
    ends = np.asarray(episode_ends)
    if ends.ndim != 1:
        raise ValueError(f"episode_ends must be 1-D, got shape {ends.shape}.")
    if ends.size and not np.issubdtype(ends.dtype, np.integer):
        raise ValueError(f"episode_ends must be integers, got dtype {ends.dtype}.")
    ends = ends.astype(np.int64)
    if ends.size and (ends[0] < 0 or np.any(np.diff(ends) < 0)):
        raise ValueError("episode_ends must be non-negative and non-decreasing (cumulative ends).")
    return ends


class SequenceSampler:
    """One sample per timestep of every selected episode.

    For the sample at step ``t`` of an episode spanning global ``[start, end)``:

    * ``obs_indices[i]`` = ``start+t-n_obs_steps+1 .. start+t`` clamped into
      ``[start, end-1]`` (edge padding repeats the first frame);
    * ``action_indices[i]`` = ``start+t+action_offset .. +horizon-1`` clamped
      into ``[start, end-1]``; ``action_is_pad[i, j]`` is True exactly where the
      unclamped index lies outside ``[start, end)``.

    Windows never cross an episode boundary. ``sample_episode`` / ``sample_step``
    give the episode id and in-episode step ``t`` of every sample.
    """

    def __init__(
        self,
        episode_ends: np.ndarray,
        episode_ids: np.ndarray,
        n_obs_steps: int,
        horizon: int,
        action_offset: int = 0,
    ):
        if int(n_obs_steps) < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}.")
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}.")
        ends = _check_episode_ends(episode_ends)
        ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(ends)):
            raise ValueError(
                f"episode_ids must lie in [0, {len(ends)}), got min {ids.min()} max {ids.max()}."
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("episode_ids contains duplicates.")

        self.n_obs_steps = int(n_obs_steps)
        self.horizon = int(horizon)
        self.action_offset = int(action_offset)
        self.episode_ids = ids

        starts_all = episode_starts(ends)
        ep_start = starts_all[ids]
        ep_end = ends[ids]
        lengths = ep_end - ep_start
        n = int(lengths.sum())

        # Per-sample episode bookkeeping, fully vectorized.
        self.sample_episode = np.repeat(ids, lengths)
        first_sample = np.cumsum(lengths) - lengths  # first sample index of each episode
        self.sample_step = np.arange(n, dtype=np.int64) - np.repeat(first_sample, lengths)
        start = np.repeat(ep_start, lengths)[:, None]
        last = np.repeat(ep_end, lengths)[:, None] - 1
        current = start[:, 0] + self.sample_step

        obs_raw = current[:, None] + np.arange(-self.n_obs_steps + 1, 1, dtype=np.int64)
        self.obs_indices = np.clip(obs_raw, start, last).astype(np.int64)

        act_raw = current[:, None] + self.action_offset + np.arange(self.horizon, dtype=np.int64)
        self.action_is_pad = (act_raw < start) | (act_raw > last)
        self.action_indices = np.clip(act_raw, start, last).astype(np.int64)

        # Shape the empty case consistently.
        self.obs_indices = self.obs_indices.reshape(n, self.n_obs_steps)
        self.action_indices = self.action_indices.reshape(n, self.horizon)
        self.action_is_pad = self.action_is_pad.reshape(n, self.horizon)

    def __len__(self) -> int:
        return len(self.sample_step)

    def __repr__(self) -> str:
        return (
            f"SequenceSampler(n_samples={len(self)}, n_episodes={len(self.episode_ids)}, "
            f"n_obs_steps={self.n_obs_steps}, horizon={self.horizon}, "
            f"action_offset={self.action_offset})"
        )
