"""Name-based policy factory: `make_policy`, `load_policy`, `@register_policy("name")`.

The registry is lazy: a name maps to the module that defines the policy, imported on first use, so
that loading one policy on a robot imports that policy's code and dependencies only. A policy
defined elsewhere registers itself with `@register_policy` when its module is imported, or adds its
module to `POLICY_MODULES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from il_policies.checkpoint import CheckpointError, read_checkpoint
from il_policies.policies.base import Policy
from il_policies.policies.config import PolicyConfig, config_from_dict

POLICY_MODULES = {
    "act": "il_policies.policies.act",
    "bc": "il_policies.policies.bc",
    "bvae": "il_policies.policies.bvae",
    "diffusion": "il_policies.policies.diffusion",
    "latent_bc": "il_policies.policies.latent_bc",
    "vae_nn": "il_policies.policies.vae_nn",
}
_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(name: str):
    def decorate(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if cls.config_class.name != name:
            raise ValueError(f"{cls.config_class.__qualname__}.name is {cls.config_class.name!r}; the registered name is {name!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_policies() -> list[str]:
    return sorted(set(POLICY_MODULES) | set(_REGISTRY))


def policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY and name in POLICY_MODULES:
        importlib.import_module(POLICY_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name]


def make_config(options: Mapping[str, Any]) -> PolicyConfig:
    """The policy's config dataclass from a mapping with its `name` (e.g. a Hydra `policy` group)."""
    omegaconf = sys.modules.get("omegaconf")  # a Hydra config node; never imported here (a robot has no omegaconf)
    if omegaconf is not None and isinstance(options, omegaconf.DictConfig):
        options = omegaconf.OmegaConf.to_container(options, resolve=True)
    if "name" not in options:
        raise ValueError(f"a policy config needs a 'name' (one of {', '.join(available_policies())})")
    return config_from_dict(policy_class(options["name"]).config_class, options, where=f"policy {options['name']!r}:")


def make_policy(options: Mapping[str, Any] | PolicyConfig, shape_meta: Mapping[str, Any]) -> Policy:
    """A policy from its config (a dataclass, or a mapping such as the Hydra `policy` group)."""
    config = options if isinstance(options, PolicyConfig) else make_config(options)
    return policy_class(config.name)(config, shape_meta)


def config_to_dict(config: PolicyConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_policy(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "torch",
                accel: bool = False, compile: bool = False, num_threads: int | None = None,
                onnx_path: str | os.PathLike | None = None) -> Policy:
    """Rebuild a policy, with its normalizer, from a checkpoint file alone (no Hydra, no dataset).

    The returned policy is in eval mode, on `device`, with the inference weights (EMA when trained
    with EMA). `policy.checkpoint_meta` holds the task metadata and training step, and
    `policy.metadata` the schema a robot needs.

    How the network runs (the speed layer, `il_policies.accel`; every option computes the same actions):
    - `backend="torch"`: the policy's own network in eager PyTorch; `accel=True` swaps in the faster
      equivalent modules, `compile=True` wraps the network in `torch.compile` (slow first call).
    - `backend="onnxruntime"` / `"openvino"`: the network exported to ONNX (cached next to the
      checkpoint, `best.pt` -> `best.onnx`, or at `onnx_path`; re-exported when the checkpoint changes)
      and run by that runtime on the CPU.
    `num_threads` sets the CPU threads (torch's for the process, and the runtime's).
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    payload = read_checkpoint(checkpoint_path)
    for key in ("policy_name", "policy_config", "shape_meta", "policy_state"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {checkpoint_path} has no {key!r} entry")
    policy = make_policy({**payload["policy_config"], "name": payload["policy_name"]}, payload["shape_meta"])
    policy.load_state_dict(payload["policy_state"])
    if not bool(policy.normalizer.fitted):
        raise CheckpointError(f"checkpoint {checkpoint_path} holds a policy whose normalizer was never fitted")
    policy.checkpoint_meta = {
        "task": payload.get("task_meta", {}),
        "step": payload.get("step"),
        "metrics": payload.get("metrics", {}),
    }
    policy = policy.to(device).eval()
    if backend != "torch":
        from il_policies.accel.backends import use_exported_network

        if compile or torch.device(device).type != "cpu":
            raise ValueError(f"backend={backend!r} runs on the CPU without torch.compile; use backend='torch' for device={device} or compile=True")
        use_exported_network(policy, checkpoint_path, backend, onnx_path, num_threads)
        return policy
    if accel:
        from il_policies.accel import accelerate

        accelerate(policy)
    if compile:
        policy.use_backend(torch.compile(policy._predict_action_chunk))
    return policy
