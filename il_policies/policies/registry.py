"""Name-based policy factory: `@register_policy("name")`, `make_policy`, `load_policy`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch

from il_policies.checkpoint import CheckpointError, read_checkpoint
from il_policies.policies.base import Policy, PolicyConfig

_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(name: str):
    def decorate(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name]


def make_config(name: str, options: Mapping[str, Any]) -> PolicyConfig:
    """Build the policy's config dataclass from a plain mapping (e.g. a Hydra `policy` group)."""
    config_class = policy_class(name).config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(options) - known - {"name"})
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; its options are {sorted(known)}")
    values = {}
    for key, value in options.items():
        if key == "name":
            continue
        values[key] = tuple(value) if isinstance(value, list) else value
    return config_class(**values)


def make_policy(cfg: Mapping[str, Any], shape_meta: Mapping[str, Any]) -> Policy:
    """`cfg` is the policy config group: `{"name": "bc", ...options}` (a dict or an OmegaConf node)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # load_policy on a robot does not need omegaconf
        pass
    cfg = dict(cfg)
    config = make_config(cfg["name"], cfg)
    return policy_class(cfg["name"])(config, shape_meta)


def config_to_dict(config: PolicyConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_policy(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu", compile: bool = False,
                num_threads: int | None = None) -> Policy:
    """Rebuild a policy, with its normalizer, from a checkpoint file alone (no Hydra, no dataset).

    The returned policy is in eval mode, on `device`, with the inference weights (EMA when trained
    with EMA). `policy.checkpoint_meta` holds the task metadata and training step, and
    `policy.metadata` the schema a robot needs. `compile=True` wraps the network in `torch.compile`
    (slow first call, faster later ones on some models and machines). `num_threads` sets torch's CPU
    threads for the process.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    payload = read_checkpoint(checkpoint_path)
    for key in ("policy_name", "policy_config", "shape_meta", "policy_state"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {checkpoint_path} has no {key!r} entry")
    config = make_config(payload["policy_name"], payload["policy_config"])
    policy = policy_class(payload["policy_name"])(config, payload["shape_meta"])
    policy.load_state_dict(payload["policy_state"])
    if not bool(policy.normalizer.fitted):
        raise CheckpointError(f"checkpoint {checkpoint_path} holds a policy whose normalizer was never fitted")
    policy.checkpoint_meta = {
        "task": payload.get("task_meta", {}),
        "step": payload.get("step"),
        "metrics": payload.get("metrics", {}),
    }
    policy = policy.to(device).eval()
    if compile:
        policy._predict_action_chunk = torch.compile(policy._predict_action_chunk)
    return policy
