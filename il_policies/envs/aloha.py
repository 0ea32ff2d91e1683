"""ALOHA bimanual tasks (gym-aloha's joint-space MuJoCo scenes) as `Task` objects.

Two tasks, each in a low-dim and an image variant:

- ``aloha_transfer_cube`` / ``aloha_transfer_cube_image``: the right arm picks a red cube and hands
  it to the left arm (success: the left finger touches the cube and the cube is off the table).
- ``aloha_insertion`` / ``aloha_insertion_image``: the right arm picks a peg, the left a socket, and
  they insert the peg into the socket (success: the peg touches the pin inside the socket).

The env wraps gym-aloha's ``TransferCubeTask`` / ``InsertionTask`` through ``dm_control`` exactly as
gym-aloha's ``AlohaEnv`` does (50 Hz control, 10 physics sub-steps), with three changes:

- no global ``BOX_POSE``: object poses come from a ``np.random.Generator`` seeded by the reset seed
  and are handed to the dm_control task directly (same seed -> same scene);
- no rendering inside the dm_control task (gym-aloha renders three 480x640 cameras per step); the
  image variant renders ONE camera with a ``mujoco.Renderer`` created directly at
  ``image_size x image_size`` (no 480x640 render + downscale), shadows / reflections / multi-sampling
  off. The square frame uses the camera's vertical fovy (78 deg), so it shows the central
  ``image_size``-wide crop of what a 4:3 frame would show, at the same vertical field of view;
- the episode lasts 400 steps (the scripted insertion succeeds at steps ~350-385).

Action: 14 float32 = [left 6 joint positions, left gripper (0 closed .. 1 open),
right 6 joint positions, right gripper]. ``info["is_success"]`` is True when the reward AT THIS STEP
equals the task's max reward (4); the rewards are contact-based, so success can come and go. The env
never terminates on success (``terminated`` is always False) and truncates at step 400.
"""

from __future__ import annotations

from il_policies.envs.rendering import close_renderer, make_renderer  # before dm_control / mujoco

from typing import Any

import gymnasium as gym
import numpy as np
from dm_control.suite import base as dm_base
from gym_aloha.constants import START_ARM_POSE
from gym_aloha.tasks.sim import InsertionTask, TransferCubeTask

from il_policies.data.store import KeySpec
from il_policies.envs.aloha_expert import AlohaScriptedExpert
from il_policies.envs.aloha_scene import (
    ALOHA_TASKS,
    ENV_STATE_DIM,
    MAX_EPISODE_STEPS,
    MAX_REWARD,
    check_task,
    load_physics,
    make_dm_env,
    object_qpos_slice,
    sample_object_pose,
)
from il_policies.envs.base import Task

__all__ = [
    "ALOHA_TASKS",
    "ALOHA_TASK_NAMES",
    "AlohaJointEnv",
    "make_aloha_task",
    "sample_object_pose",
]

ALOHA_TASK_NAMES = tuple(n for t in ALOHA_TASKS for n in (f"aloha_{t}", f"aloha_{t}_image"))
FPS = 50.0
CAMERAS = ("top", "angle", "front_close", "left_pillar", "right_pillar", "left_wrist", "right_wrist")

# Arm joint limits (the position actuators' ctrlrange in gym-aloha's XML) and the gripper command
# range [0, 1] (0 = closed, 1 = open; the finger actuators clip it to [0.065, 0.975]).
_ARM_LOW = np.array([-3.14158, -1.85005, -1.76278, -3.14158, -1.8675, -3.14158], dtype=np.float32)
_ARM_HIGH = np.array([3.14158, 1.25664, 1.6057, 3.14158, 2.23402, 3.14158], dtype=np.float32)
ACTION_LOW = np.concatenate([_ARM_LOW, [0.0], _ARM_LOW, [0.0]]).astype(np.float32)
ACTION_HIGH = np.concatenate([_ARM_HIGH, [1.0], _ARM_HIGH, [1.0]]).astype(np.float32)


class _PoseMixin:
    """Replaces gym-aloha's global-`BOX_POSE` reset and its 3-camera rendering observation."""

    object_pose: np.ndarray | None = None
    aloha_task: str = ""

    def initialize_episode(self, physics):  # called by control.Environment inside reset_context()
        if self.object_pose is None:
            raise RuntimeError("set `object_pose` before resetting the dm_control environment")
        physics.named.data.qpos[:16] = START_ARM_POSE
        np.copyto(physics.data.ctrl, START_ARM_POSE)
        physics.data.qpos[object_qpos_slice(self.aloha_task)] = self.object_pose
        dm_base.Task.initialize_episode(self, physics)

    def get_observation(self, physics):
        return {"qpos": self.get_qpos(physics), "env_state": physics.data.qpos[16:].copy()}


class _TransferCubeJointTask(_PoseMixin, TransferCubeTask):
    aloha_task = "transfer_cube"


class _InsertionJointTask(_PoseMixin, InsertionTask):
    aloha_task = "insertion"


class AlohaJointEnv(gym.Env):
    """gym-aloha's joint-space ALOHA task; see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        task: str = "transfer_cube",
        image: bool = False,
        image_size: int = 96,
        camera: str = "top",
        max_episode_steps: int = MAX_EPISODE_STEPS,
    ):
        super().__init__()
        check_task(task)
        if camera not in CAMERAS:
            raise ValueError(f"Unknown camera {camera!r}; known cameras: {', '.join(CAMERAS)}")
        self.task, self.image, self.image_size, self.camera = task, bool(image), int(image_size), camera
        self.max_episode_steps = int(max_episode_steps)
        self.render_mode = "rgb_array"
        self._physics = load_physics(task)
        self._dm_task = (_TransferCubeJointTask if task == "transfer_cube" else _InsertionJointTask)()
        self._env = make_dm_env(self._physics, self._dm_task)
        self._renderer = None  # created lazily: the low-dim variant never touches OpenGL

        obs_spaces: dict[str, gym.Space] = {
            "agent_pos": gym.spaces.Box(-np.inf, np.inf, (14,), np.float32),
        }
        if self.image:
            obs_spaces["image"] = gym.spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        else:
            obs_spaces["env_state"] = gym.spaces.Box(-np.inf, np.inf, (ENV_STATE_DIM[task],), np.float32)
        self.observation_space = gym.spaces.Dict(obs_spaces)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)

        self._t = 0
        self._seed: int | None = None
        self._object_pose: np.ndarray | None = None

    # --- rendering -------------------------------------------------------------------------------
    def _render_camera(self, size: int | None = None) -> np.ndarray:
        size = self.image_size if size is None else int(size)
        if self._renderer is None or self._renderer.height != size:
            if self._renderer is not None:
                close_renderer(self._renderer)
            self._renderer = make_renderer(self._physics.model.ptr, size, size, skybox=False)
        self._renderer.update_scene(self._physics.data.ptr, camera=self.camera)
        return self._renderer.render()

    def render(self) -> np.ndarray:
        return self._render_camera()

    # --- gym API ---------------------------------------------------------------------------------
    def _obs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {"agent_pos": np.asarray(raw["qpos"], dtype=np.float32)}
        if self.image:
            obs["image"] = self._render_camera()
        else:
            obs["env_state"] = np.asarray(raw["env_state"], dtype=np.float32)
        return obs

    def _info(self, reward: float) -> dict[str, Any]:
        return {
            "is_success": bool(reward >= MAX_REWARD),
            "reward_stage": int(reward),
            "expert_obs": {"seed": self._seed, "object_pose": self._object_pose.copy(), "step": self._t},
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # The seed alone decides the scene; without one, draw an episode seed from the env's generator.
        self._seed = int(seed) if seed is not None else int(self.np_random.integers(2**31 - 1))
        self._object_pose = sample_object_pose(self.task, self._seed)
        self._dm_task.object_pose = self._object_pose
        self._t = 0
        ts = self._env.reset()
        return self._obs(ts.observation), self._info(0.0)

    def step(self, action):
        if self._object_pose is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64).reshape(14)
        ts = self._env.step(action)
        self._t += 1
        reward = float(ts.reward or 0.0)
        truncated = self._t >= self.max_episode_steps
        return self._obs(ts.observation), reward, False, truncated, self._info(reward)

    def close(self):
        if self._renderer is not None:
            close_renderer(self._renderer)
            self._renderer = None


def make_aloha_task(
    task: str, image: bool = False, image_size: int = 96, camera: str = "top", expert_noise: float = 0.0
) -> Task:
    """`Task` for "transfer_cube" or "insertion".

    Also accepts the task names ("aloha_insertion_image" = insertion with image=True). `expert_noise`
    (metres) is passed to the scripted expert (see `AlohaScriptedExpert`). Images are rendered from
    `camera` directly at `image_size` x `image_size`."""
    name = str(task)
    if name in ALOHA_TASK_NAMES:
        image = image or name.endswith("_image")
        name = name.removeprefix("aloha_").removesuffix("_image")
    if name not in ALOHA_TASKS:
        raise ValueError(
            f"Unknown ALOHA task {task!r}; known: {', '.join(ALOHA_TASKS)} "
            f"(task names: {', '.join(ALOHA_TASK_NAMES)})"
        )
    keys = {"agent_pos": KeySpec((14,), "float32", "low_dim")}
    if image:
        keys["image"] = KeySpec((image_size, image_size, 3), "uint8", "rgb")
    else:
        keys["env_state"] = KeySpec((ENV_STATE_DIM[name],), "float32", "low_dim")
    keys["action"] = KeySpec((14,), "float32", "action")
    return Task(
        name=f"aloha_{name}" + ("_image" if image else ""),
        keys=keys,
        make_env=lambda: AlohaJointEnv(name, image=image, image_size=image_size, camera=camera),
        make_expert=lambda: AlohaScriptedExpert(name, noise=expert_noise),
        max_episode_steps=MAX_EPISODE_STEPS,
        fps=FPS,
        action_low=ACTION_LOW.copy(),
        action_high=ACTION_HIGH.copy(),
    )
