"""Every value of the `train.py` config checked before anything runs: one sentence naming the key,
the value and what it must be (Hydra already refuses unknown keys and values of the wrong type)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is out of range or names something that does not exist."""


def _check(ok: bool, key: str, value, must: str) -> None:
    if not ok:
        raise ConfigError(f"config value {key}={value!r} is invalid: it must be {must}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_integers(values: dict, minimum: int) -> None:
    """Each `key: value` an integer >= minimum (counts: 1; offsets and seeds: 0)."""
    for key, value in values.items():
        _check(_is_int(value) and value >= minimum, key, value,
               "a positive integer" if minimum == 1 else f"an integer >= {minimum}")


def check_device(name: str) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and a GPU that exists when one is named."""
    _check(isinstance(name, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", name or "") is not None,
           "device", name, "one of auto, cpu, cuda, cuda:N")
    if not name.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ConfigError(f"config value device={name!r} is invalid: torch {torch.__version__} ({build}) finds no "
                          f"CUDA GPU on this machine; use device=cpu or device=auto.")
    index = int(name.split(":")[1]) if ":" in name else 0
    _check(index < count, "device", name, f"a GPU index below {count}, the number of GPUs torch finds")


def check_train_config(cfg: DictConfig) -> None:
    t, e, d = cfg.training, cfg.eval, cfg.data
    check_integers({"training.steps": t.steps, "training.batch_size": t.batch_size, "training.log_every": t.log_every,
                    "training.val_every": t.val_every, "training.checkpoint_every": t.checkpoint_every,
                    "eval.n_envs": e.n_envs}, minimum=1)
    check_integers({"eval.every": e.every, "eval.n_episodes": e.n_episodes, "eval.n_videos": e.n_videos,
                    "eval.seed_start": e.seed_start, "data.num_workers": d.num_workers, "seed": cfg.seed}, minimum=0)
    for key, value in {"training.num_threads": t.num_threads, "data.max_train_episodes": d.max_train_episodes}.items():
        _check(value is None or (_is_int(value) and value >= 1), key, value, "a positive integer or null")
    _check(_is_number(d.val_ratio) and 0 <= d.val_ratio < 1, "data.val_ratio", d.val_ratio, "a number in [0, 1)")
    _check(str(d.in_memory).lower() in ("auto", "true", "false"), "data.in_memory", d.in_memory, "one of auto, true, false")
    _check(d.batch_order in ("random", "chunked"), "data.batch_order", d.batch_order, "one of random, chunked")
    for key in ("memory_budget_mb", "cache_mb"):
        _check(_is_number(d[key]) and d[key] >= 0, f"data.{key}", d[key], "a number of MiB >= 0")
    check_integers({"data.chunks_per_shuffle": d.chunks_per_shuffle, "data.prefetch_batches": d.prefetch_batches}, minimum=1)
    if t.lr is not None:
        _check(_is_number(t.lr) and t.lr > 0, "training.lr", t.lr, "a positive number")
    for key in ("weight_decay", "grad_clip"):
        if (value := t[key]) is not None:
            _check(_is_number(value) and value >= 0, f"training.{key}", value, "a number >= 0")
    if t.lr_warmup_steps is not None:
        _check(_is_int(t.lr_warmup_steps) and 0 <= t.lr_warmup_steps, "training.lr_warmup_steps", t.lr_warmup_steps,
               "an integer >= 0")
    if t.betas is not None:
        betas = list(t.betas)
        _check(len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas), "training.betas", betas,
               "two numbers in [0, 1)")
    if t.lr_scheduler is not None:
        from diffusers.optimization import SchedulerType

        names = [s.value for s in SchedulerType]
        _check(t.lr_scheduler in names, "training.lr_scheduler", t.lr_scheduler, f"one of {', '.join(names)}")
    if t.ema.decay is not None:
        _check(_is_number(t.ema.decay) and 0 < t.ema.decay <= 1, "training.ema.decay", t.ema.decay, "a number in (0, 1]")
    if t.ema.power is not None:
        _check(_is_number(t.ema.power) and t.ema.power > 0, "training.ema.power", t.ema.power, "a positive number")
    _check(cfg.logger.mode in ("offline", "online", "disabled"), "logger.mode", cfg.logger.mode,
           "one of offline, online, disabled")
    check_device(cfg.device)
    _check_dataset_path(cfg.task)


def _check_dataset_path(task: DictConfig) -> None:
    path = OmegaConf.select(task, "dataset_path")
    _check(isinstance(path, str) and path != "", "task.dataset_path", path, "a path")
    suite = OmegaConf.select(task, "suite")
    if "://" in path:  # a remote store: opening it says what is wrong with it; tasks generate only to local disk
        _check(suite in (None, "dataset"), "task.dataset_path", path, "a local path for a task that generates its dataset")
        return
    if OmegaConf.select(task, "suite") in (None, "dataset") and not Path(path).exists():  # nothing generates it
        raise ConfigError(f"config value task.dataset_path={path!r} is invalid: the path does not exist.")
    _check(not Path(path).is_file(), "task.dataset_path", path, "a zarr store folder, not a file")
