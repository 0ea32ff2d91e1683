"""gym-aloha's ALOHA scenes as both the joint-space env (`aloha.py`) and the scripted expert
(`aloha_expert.py`) load them: task names, episode constants, seeded object poses, physics and the
dm_control environment around it. Imports nothing else from this package but the rendering set-up
and the task names.
"""

from __future__ import annotations

import il_policies.envs.rendering  # noqa: F401  (must precede dm_control / mujoco)

import numpy as np
from dm_control import mujoco as dm_mujoco
from dm_control.rl import control
from dm_control.suite import base as dm_base
from gym_aloha.constants import ASSETS_DIR, DT

from il_policies.envs import ALOHA_TASKS  # the task names, known without importing a simulator

__all__ = [
    "ALOHA_TASKS",
    "ENV_STATE_DIM",
    "MAX_EPISODE_STEPS",
    "MAX_REWARD",
    "check_task",
    "load_physics",
    "make_dm_env",
    "object_qpos_slice",
    "sample_object_pose",
]

MAX_EPISODE_STEPS = 400
MAX_REWARD = 4
ENV_STATE_DIM = {"transfer_cube": 7, "insertion": 14}

# Object placement ranges (x, y, z) of gym-aloha's samplers (gym_aloha/utils.py); quaternions are identity.
_RANGES = {
    "transfer_cube": [((0.0, 0.2), (0.4, 0.6), (0.05, 0.05))],
    "insertion": [((0.1, 0.2), (0.4, 0.6), (0.05, 0.05)), ((-0.2, -0.1), (0.4, 0.6), (0.05, 0.05))],
}


def check_task(task: str) -> None:
    if task not in ALOHA_TASKS:
        raise ValueError(f"Unknown ALOHA task {task!r}; known tasks: {', '.join(ALOHA_TASKS)}")


def sample_object_pose(task: str, seed: int) -> np.ndarray:
    """Object pose(s) for `seed`: (7,) cube [xyz, wxyz] or (14,) peg + socket. Seed alone decides."""
    check_task(task)
    rng = np.random.default_rng(int(seed))
    poses = []
    for ranges in _RANGES[task]:
        lo, hi = np.array(ranges, dtype=np.float64).T
        poses += [rng.uniform(lo, hi), np.array([1.0, 0.0, 0.0, 0.0])]
    return np.concatenate(poses)


def load_physics(task: str, end_effector: bool = False) -> dm_mujoco.Physics:
    """gym-aloha's MuJoCo scene for `task` (joint-space, or the mocap end-effector version)."""
    check_task(task)
    prefix = "bimanual_viperx_end_effector_" if end_effector else "bimanual_viperx_"
    return dm_mujoco.Physics.from_xml_path(str(ASSETS_DIR / f"{prefix}{task}.xml"))


def object_qpos_slice(task: str) -> slice:
    """Where the free-joint object poses live in qpos (after the 16 robot joints)."""
    return slice(16, 16 + ENV_STATE_DIM[task])


def make_dm_env(physics: dm_mujoco.Physics, dm_task: dm_base.Task) -> control.Environment:
    """dm_control environment as gym-aloha builds it (the time limit is ours to enforce)."""
    return control.Environment(
        physics, dm_task, time_limit=float("inf"), control_timestep=DT, n_sub_steps=None,
        flat_observation=False,
    )
