"""Tasks: named simulated tasks with scripted experts (Meta-World, ALOHA).

Names are `<suite>_<task>[_image]`: `metaworld_push`, `metaworld_push_image`,
`aloha_transfer_cube_image`. Simulator modules are imported only when a task of theirs is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from il_policies.envs.base import Expert, Task

SUITES = ("metaworld", "aloha")
ALOHA_TASKS = ("transfer_cube", "insertion")


def canonical_task_name(suite: str, env_name: str, image: bool = False) -> str:
    """`("metaworld", "window-open-v3", True)` -> `metaworld_window_open_image`."""
    if suite == "metaworld":
        base = env_name.removesuffix("-v3").replace("-", "_")
    elif suite == "aloha":
        base = env_name
    else:
        raise ValueError(f"unknown task suite {suite!r}; known suites: {', '.join(SUITES)}")
    return f"{suite}_{base}" + ("_image" if str(image).lower() == "true" else "")


def known_task_names() -> list[str]:
    from il_policies.envs.metaworld import KNOWN_ENV_NAMES

    names = [canonical_task_name("metaworld", env, image) for env in KNOWN_ENV_NAMES for image in (False, True)]
    names += [canonical_task_name("aloha", env, image) for env in ALOHA_TASKS for image in (False, True)]
    return sorted(names)


def make_task(suite: str, env_name: str, image: bool = False, **options: Any) -> Task:
    """Build a task; `options` go to the suite's factory (e.g. `image_size`, `camera`)."""
    options = {key: value for key, value in options.items() if value is not None}
    if suite == "metaworld":
        from il_policies.envs.metaworld import KNOWN_ENV_NAMES, make_metaworld_task

        if env_name not in KNOWN_ENV_NAMES:
            raise ValueError(f"unknown task {canonical_task_name(suite, env_name, image)!r}; known tasks: {', '.join(known_task_names())}")
        return make_metaworld_task(env_name, image=image, **options)
    if suite == "aloha":
        from il_policies.envs.aloha import make_aloha_task

        if env_name not in ALOHA_TASKS:
            raise ValueError(f"unknown task {canonical_task_name(suite, env_name, image)!r}; known tasks: {', '.join(known_task_names())}")
        return make_aloha_task(env_name, image=image, **options)
    raise ValueError(f"unknown task suite {suite!r}; known suites: {', '.join(SUITES)}")


def make_task_by_name(name: str, **options: Any) -> Task:
    """`metaworld_push_image` -> the Meta-World push task with images."""
    image = name.endswith("_image")
    base = name.removesuffix("_image")
    for suite in SUITES:
        if base.startswith(f"{suite}_"):
            env_name = base.removeprefix(f"{suite}_")
            if suite == "metaworld":
                env_name = env_name.replace("_", "-") + "-v3"
            return make_task(suite, env_name, image, **options)
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known_task_names())}")


def task_from_config(cfg: Mapping[str, Any]) -> Task | None:
    """The task a Hydra `task` group describes, or None for a plain dataset without a simulator."""
    suite = cfg.get("suite")
    if suite in (None, "dataset"):
        return None
    return make_task(suite, cfg["env_name"], bool(cfg.get("image", False)), **dict(cfg.get("env_options") or {}))


def _register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("task_name"):
        OmegaConf.register_new_resolver("task_name", canonical_task_name)


try:
    _register_resolver()
except ImportError:  # omegaconf is only needed for the Hydra configs
    pass

__all__ = ["Expert", "Task", "canonical_task_name", "known_task_names", "make_task", "make_task_by_name", "task_from_config"]
