"""Scripted ALOHA expert (the ACT paper's recipe, see /work/shared/specs/aloha-expert.md).

At `reset(seed)` the expert builds the mocap (end-effector) version of the same scene (same object
poses), applies the MuJoCo-3 weld patch to that model only, rolls out an open-loop waypoint policy
(xyz + wxyz quaternion + gripper per arm, linearly interpolated), records the joint positions visited
and replaces each gripper joint by the normalized gripper command. `act` then returns step t of that
joint trajectory, to be replayed in `AlohaJointEnv` (the joint-space task).

Alignment: action t is the joint configuration the end-effector rollout reached AFTER its step t
(the position controllers then chase a target one step ahead, which is what they need to keep up).
"""

from __future__ import annotations

import il_policies.envs.rendering  # noqa: F401  (must precede dm_control / mujoco)

from typing import Any

import numpy as np
from dm_control.suite import base as dm_base
from gym_aloha.constants import normalize_puppet_gripper_position
from gym_aloha.tasks.sim_end_effector import InsertionEndEffectorTask, TransferCubeEndEffectorTask

from il_policies.envs.aloha_scene import (
    MAX_EPISODE_STEPS,
    MAX_REWARD,
    check_task,
    load_physics,
    make_dm_env,
    object_qpos_slice,
    sample_object_pose,
)

__all__ = ["AlohaScriptedExpert", "apply_weld_patch", "rollout_end_effector", "waypoints"]


# --- end-effector scene ------------------------------------------------------------------------
class _EEPoseMixin:
    object_pose: np.ndarray | None = None
    aloha_task: str = ""

    def initialize_episode(self, physics):  # inside control.Environment's reset_context()
        self.initialize_robots(physics)  # arms at START_ARM_POSE, mocaps on the grippers, grippers closed
        physics.data.qpos[object_qpos_slice(self.aloha_task)] = self.object_pose
        dm_base.Task.initialize_episode(self, physics)

    def get_observation(self, physics):
        return {}


class _TransferCubeEETask(_EEPoseMixin, TransferCubeEndEffectorTask):
    aloha_task = "transfer_cube"


class _InsertionEETask(_EEPoseMixin, InsertionEndEffectorTask):
    aloha_task = "insertion"


def apply_weld_patch(physics) -> None:
    """MuJoCo >= 3.0 approximates a weld's rotational constraint inertia ~400x softer than 2.3.7 did,
    so the mocap-welded gripper lags its target and the object slips. Copy the translational inverse
    weight into the rotational slot for both gripper links (reproduces MuJoCo 2.3.7, which ACT used)."""
    model = physics.model
    for side in ("left", "right"):
        gid = model.name2id(f"vx300s_{side}/gripper_link", "body")
        model.body_invweight0[gid, 1] = model.body_invweight0[gid, 0]


# --- waypoint policy -----------------------------------------------------------------------------
def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ])


def _axis_quat(axis, degrees: float) -> np.ndarray:
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * np.asarray(axis, dtype=np.float64)])


def waypoints(task: str, object_pose: np.ndarray, init_left: np.ndarray, init_right: np.ndarray, offset=None):
    """Timed waypoints per arm: lists of (t, xyz(3), quat wxyz(4), gripper) (gripper 1 = open).

    `init_*` are the initial mocap poses (xyz + wxyz). `offset(target) -> (3,)` perturbs each distinct
    free-space target (an object's approach point, the meeting point shared by both arms) once, so
    every waypoint that refers to it moves with it (holds stay holds, the arms still meet). Grasp
    points are never perturbed: an off-centre grasp moves the object inside the gripper, which
    breaks the insertion alignment (0.01 m grasp noise: insertion 19/20 -> 11/20)."""
    off = offset or (lambda target: np.zeros(3))
    (l0, ql0), (r0, qr0) = (init_left[:3], init_left[3:]), (init_right[:3], init_right[3:])
    y_axis = [0.0, 1.0, 0.0]
    if task == "transfer_cube":
        cube = object_pose[:3]
        above, grasp = cube + [0, 0, 0.08] + off("cube_above"), cube + [0, 0, -0.015]
        pick = _quat_mul(qr0, _axis_quat(y_axis, -60))
        meet_l = _axis_quat([1.0, 0.0, 0.0], 90)
        ident = np.array([1.0, 0.0, 0.0, 0.0])
        m = np.array([0.0, 0.5, 0.25]) + off("meet")
        left = [
            (0, l0, ql0, 0),
            (100, m + [-0.1, 0, -0.02], meet_l, 1),  # approach the meeting point
            (260, m + [0.02, 0, -0.02], meet_l, 1),  # move in
            (310, m + [0.02, 0, -0.02], meet_l, 0),  # close on the cube
            (360, m + [-0.1, 0, -0.02], ident, 0),  # pull away
            (400, m + [-0.1, 0, -0.02], ident, 0),
        ]
        right = [
            (0, r0, qr0, 0),
            (90, above, pick, 1),  # above the cube
            (130, grasp, pick, 1),  # down
            (170, grasp, pick, 0),  # grasp
            (200, m + [0.05, 0, 0], pick, 0),  # to the meeting point
            (220, m, pick, 0),
            (310, m, pick, 1),  # release
            (360, m + [0.1, 0, 0], pick, 1),  # retreat
            (400, m + [0.1, 0, 0], pick, 1),
        ]
    elif task == "insertion":
        peg, socket = object_pose[:3], object_pose[7:10]
        peg_above, peg_grasp = peg + [0, 0, 0.08] + off("peg_above"), peg + [0, 0, -0.03]
        sock_above = socket + [0, 0, 0.08] + off("socket_above")
        sock_grasp = socket + [0, 0, -0.03]
        pick_r = _quat_mul(qr0, _axis_quat(y_axis, -60))
        pick_l = _quat_mul(qr0, _axis_quat(y_axis, 60))  # ACT also starts from the right mocap quat
        m, lift = np.array([0.0, 0.5, 0.15]) + off("meet"), 0.00715
        left = [
            (0, l0, ql0, 0),
            (120, sock_above, pick_l, 1),
            (170, sock_grasp, pick_l, 1),
            (220, sock_grasp, pick_l, 0),
            (285, m + [-0.1, 0, 0], pick_l, 0),
            (340, m + [-0.05, 0, 0], pick_l, 0),  # insert
            (400, m + [-0.05, 0, 0], pick_l, 0),
        ]
        right = [
            (0, r0, qr0, 0),
            (120, peg_above, pick_r, 1),
            (170, peg_grasp, pick_r, 1),
            (220, peg_grasp, pick_r, 0),
            (285, m + [0.1, 0, lift], pick_r, 0),
            (340, m + [0.05, 0, lift], pick_r, 0),
            (400, m + [0.05, 0, lift], pick_r, 0),
        ]
    else:
        check_task(task)
    return left, right


def _interpolate(table, n_steps: int) -> np.ndarray:
    """(n_steps, 8) = xyz, quat (linearly interpolated, un-normalized, as ACT does), gripper."""
    times = np.array([w[0] for w in table], dtype=np.float64)
    values = np.array([np.concatenate([w[1], w[2], [w[3]]]) for w in table], dtype=np.float64)
    steps = np.arange(n_steps, dtype=np.float64)
    return np.stack([np.interp(steps, times, values[:, d]) for d in range(values.shape[1])], axis=1)


def rollout_end_effector(
    task: str, object_pose: np.ndarray, n_steps: int = MAX_EPISODE_STEPS, noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Run the scripted policy in the patched end-effector scene. Returns `joint_actions` (n_steps, 14),
    `ee_actions` (n_steps, 16) and `rewards` (n_steps,) of the end-effector rollout."""
    physics = load_physics(task, end_effector=True)
    apply_weld_patch(physics)
    dm_task = (_TransferCubeEETask if task == "transfer_cube" else _InsertionEETask)()
    dm_task.object_pose = np.asarray(object_pose, dtype=np.float64)
    env = make_dm_env(physics, dm_task)
    env.reset()
    init_left = np.concatenate([physics.data.mocap_pos[0], physics.data.mocap_quat[0]])
    init_right = np.concatenate([physics.data.mocap_pos[1], physics.data.mocap_quat[1]])
    offset = None
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng()
        offsets: dict[str, np.ndarray] = {}

        def offset(target: str) -> np.ndarray:
            if target not in offsets:
                offsets[target] = rng.uniform(-noise, noise, 3)
            return offsets[target]
    left, right = waypoints(task, np.asarray(object_pose), init_left, init_right, offset)
    ee_actions = np.concatenate([_interpolate(left, n_steps), _interpolate(right, n_steps)], axis=1)

    joint_actions = np.empty((n_steps, 14), dtype=np.float64)
    rewards = np.empty(n_steps, dtype=np.float64)
    for t in range(n_steps):
        ts = env.step(ee_actions[t])
        rewards[t] = ts.reward or 0.0
        qpos = physics.data.qpos
        ctrl = physics.data.ctrl  # [left finger, -left finger, right finger, -right finger] commands
        joint_actions[t, :6] = qpos[:6]
        joint_actions[t, 6] = normalize_puppet_gripper_position(ctrl[0])
        joint_actions[t, 7:13] = qpos[8:14]
        joint_actions[t, 13] = normalize_puppet_gripper_position(ctrl[2])
    return {"joint_actions": joint_actions, "ee_actions": ee_actions, "rewards": rewards}


# --- the Expert ----------------------------------------------------------------------------------
class AlohaScriptedExpert:
    """`Expert` for `AlohaJointEnv`: replays the joint trajectory of a scripted end-effector rollout.

    `noise` (metres): uniform +- noise on the xyz of each free-space target (approach points, meeting
    point; grasp points stay exact, see `waypoints`), drawn from a generator seeded by the episode
    seed (so demonstrations stay reproducible). The plan follows the object pose in
    `info["expert_obs"]` when it differs from the one planned at `reset` (e.g. env reset without seed).
    """

    def __init__(self, task: str, noise: float = 0.0, n_steps: int = MAX_EPISODE_STEPS):
        check_task(task)
        self.task, self.noise, self.n_steps = task, float(noise), int(n_steps)
        self._pose: np.ndarray | None = None
        self._plan: dict[str, np.ndarray] | None = None
        self._t = 0

    def _make_plan(self, seed: int, pose: np.ndarray) -> None:
        rng = np.random.default_rng([int(seed), 0xA10A]) if self.noise > 0 else None
        self._pose = np.asarray(pose, dtype=np.float64).copy()
        self._plan = rollout_end_effector(self.task, self._pose, self.n_steps, self.noise, rng)
        self._t = 0

    def reset(self, seed: int) -> None:
        self._make_plan(seed, sample_object_pose(self.task, seed))

    @property
    def ee_success(self) -> bool:
        """Whether the end-effector rollout itself reached the max reward at its final step."""
        return self._plan is not None and bool(self._plan["rewards"][-1] >= MAX_REWARD)

    @property
    def joint_trajectory(self) -> np.ndarray:
        if self._plan is None:
            raise RuntimeError("call reset(seed) first")
        return self._plan["joint_actions"]

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        expert_obs = (info or {}).get("expert_obs") or {}
        pose = expert_obs.get("object_pose")
        if pose is not None and (self._pose is None or not np.allclose(pose, self._pose)):
            self._make_plan(expert_obs.get("seed") or 0, pose)
        if self._plan is None:
            raise RuntimeError("call reset(seed) first (or pass info['expert_obs'])")
        t = int(expert_obs.get("step", self._t))
        self._t = t + 1
        traj = self._plan["joint_actions"]
        return traj[min(t, len(traj) - 1)].astype(np.float32)
