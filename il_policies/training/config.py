"""The structured configs of `train.py`, registered in Hydra's ConfigStore.

`conf/config.yaml` and `conf/policy/*.yaml` hold only what differs from these dataclasses (and
from each policy's config dataclass): Hydra refuses an unknown key or a value of the wrong type
with one line. Schemas registered (`register_configs`, run on import):

- `train_schema`: the `train.py` config (`TrainConfig`);
- `policy/<name>_schema`: each registered policy's config dataclass, for the policy YAML files'
  defaults lists (`conf/policy/act.yaml` is `defaults: [act_schema, _self_]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from il_policies.policies.config import TrainingPreset
from il_policies.policies.registry import available_policies, policy_class


@dataclass
class DataConfig:
    val_ratio: float = 0.1  # fraction of whole episodes held out for validation
    max_train_episodes: int | None = None  # e.g. 8 to train on exactly 8 trajectories
    # Stores larger than memory: the cameras read chunk by chunk through a cache (false), all in memory
    # (true), or in memory when the keys in use fit memory_budget_mb decoded (auto). Same batches either way.
    in_memory: str = "auto"
    memory_budget_mb: float = 4096
    cache_mb: float = 256  # lazy reads: the decoded-chunk cache of each loading process
    # random: a seeded permutation of every window each epoch; chunked: the same, visiting the store's
    # chunks in a random order and shuffling within runs of chunks_per_shuffle (cheap lazy reads).
    batch_order: str = "random"
    chunks_per_shuffle: int = 16
    num_workers: int = 0  # loader processes, persistent, each opening the store itself
    prefetch_batches: int = 2  # batches each worker prepares ahead (num_workers > 0)


@dataclass
class EMAOverrides:
    enabled: bool | None = None
    decay: float | None = None
    power: float | None = None


@dataclass
class TrainingConfig:
    steps: int = 2000
    batch_size: int = 64  # per process; the global batch is batch_size x world size
    # Optimizer, schedule, clipping and EMA: null takes the policy's `training_preset`.
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    lr_scheduler: str | None = None  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int | None = None
    grad_clip: float | None = None  # max gradient norm; 0 clips nothing
    ema: EMAOverrides = field(default_factory=EMAOverrides)
    log_every: int = 50
    val_every: int = 500  # steps between validations (then `latest`, and `best` when validation improved)
    checkpoint_every: int = 500  # steps between `latest` checkpoints
    resume: bool = True  # continue from <run dir>/checkpoints/latest.pt when it exists
    num_threads: int | None = None  # torch CPU threads; null keeps torch's default
    accel: bool = False  # train with the speed layer's equivalent modules (il_policies/accel): the same function, faster
    compile: bool = False  # run the training forward and backward through torch.compile (slow start; see bench/ACT.md)


@dataclass
class EvalConfig:
    """Rollouts through the shared harness, on seeds disjoint from the demonstrations."""

    every: int = 0  # steps between evaluations during training (0: only at the end); needs a simulated task
    n_episodes: int = 50
    n_envs: int = 1  # parallel gymnasium vector envs
    asynchronous: bool = False  # AsyncVectorEnv (one process per env) instead of SyncVectorEnv
    n_videos: int = 1  # mp4 videos of the first episodes, under <run dir>/eval/step_N/
    seed_start: int = 1_000_000
    loss_terms: bool = False  # at the end: every loss term over the whole training and held-out splits (terms/train/*, terms/val/*)
    # and, for a world model (latent_bc), open-loop prediction on the held-out episodes (imagine/*):
    imagine_context: int = 5  # frames filtered
    imagine_predict: int = 20  # steps predicted from the recorded actions


@dataclass
class LoggerConfig:
    mode: str = "offline"  # offline (needs no network) | online | disabled
    project: str = "il-policies"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    policy: Any = MISSING  # a policy config (conf/policy/), typed by its schema
    task: Any = MISSING  # conf/task/
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def data_reading(data) -> dict:
    """`SequenceDataset.from_store`'s reading options from the `data` config."""
    in_memory = str(data.in_memory).lower()
    return {"in_memory": in_memory if in_memory == "auto" else in_memory == "true",
            "memory_budget_mb": data.memory_budget_mb, "cache_mb": data.cache_mb}


def resolved_training_preset(preset: TrainingPreset, training) -> TrainingPreset:
    """The policy's preset with every optimizer / schedule / clipping / EMA value that `training`
    (the `training` config group) sets in its place."""
    ema = {key: value for key in ("enabled", "decay", "power") if (value := training.ema[key]) is not None}
    values = {key: value for key in ("lr", "weight_decay", "lr_scheduler", "lr_warmup_steps", "grad_clip")
              if (value := training[key]) is not None}
    if training.betas is not None:
        values["betas"] = tuple(training.betas)
    return TrainingPreset(**{**preset.__dict__, **values, "ema": type(preset.ema)(**{**preset.ema.__dict__, **ema})})


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in available_policies():
        store.store(group="policy", name=f"{name}_schema", node=policy_class(name).config_class)


register_configs()

__all__ = ["TrainConfig", "register_configs", "resolved_training_preset"]
