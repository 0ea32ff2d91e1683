"""Meta-World (v3, metaworld 3.x) adapter: any of the 50 MT1 tasks as a `Task`.

Episode variation is metaworld's standard MT1 variation (goal and object positions drawn uniformly
from each env's `_random_reset_space`), but drawn from a generator seeded by `reset(seed=...)`, so a
seed fully determines the episode. The goal is observable (last 3 entries of the 39-dim state), as
in MT1. The env never terminates; it truncates at `max_episode_steps`.

Variants:
  state: obs {"state": float32 (39,)} (metaworld's full observation).
  image: obs {"image": uint8 (S, S, 3), "agent_pos": float32 (4,)} (hand xyz + gripper openness).

The expert is metaworld's own scripted policy for the task (`metaworld.policies`), fed the raw
39-dim observation from `info["expert_obs"]`.
"""

from __future__ import annotations

from il_policies.envs.rendering import close_renderer, make_renderer  # before the first `import mujoco`

import functools
import re
import warnings
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from il_policies.data.store import KeySpec
from il_policies.envs.base import Task

KNOWN_ENV_NAMES: tuple[str, ...] = tuple(sorted(ALL_V3_ENVIRONMENTS))
ACTION_DIM = 4
STATE_DIM = 39
# Past this, metaworld's own step() raises; we truncate ourselves, so push its limit out of the way.
_NO_INTERNAL_LIMIT = 2**62


def _check_name(env_name: str) -> None:
    if env_name not in ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World env {env_name!r}; known names: {', '.join(KNOWN_ENV_NAMES)}")


def task_name(env_name: str, image: bool = False) -> str:
    """'pick-place-v3' -> 'metaworld_pick_place' (+ '_image')."""
    base = re.sub(r"-v3$", "", env_name).replace("-", "_")
    return f"metaworld_{base}" + ("_image" if image else "")


def _make_raw_env(env_name: str):
    """A bare metaworld env in MT1 configuration, with per-reset seeded goal/object sampling."""
    env = ALL_V3_ENVIRONMENTS[env_name]()  # render_mode=None: no GL context is created
    env._partially_observable = False  # goal in the observation, as MT1
    env.__dict__.pop("sawyer_observation_space", None)  # cached_property: recompute with goal bounds
    env._set_task_called = True  # we do not use set_task: no fixed list of 50 goals
    env._freeze_rand_vec = False  # sample a fresh goal/object placement every reset ...
    env.seeded_rand_vec = True  # ... from env.np_random (seeded by us), not the global np.random
    env.max_path_length = _NO_INTERNAL_LIMIT
    return env


@functools.lru_cache(maxsize=None)
def _env_constants(env_name: str) -> tuple[float, int]:
    """(control frequency in Hz, metaworld's max_path_length) for one task."""
    cls = ALL_V3_ENVIRONMENTS[env_name]
    env = cls()
    try:
        fps = 1.0 / (env.frame_skip * env.model.opt.timestep)
    finally:
        env.close()
    return float(fps), int(cls.max_path_length)


class MetaWorldEnv(gym.Env):
    """Gymnasium wrapper around one metaworld v3 env (see module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        env_name: str,
        image: bool = False,
        image_size: int = 84,
        camera: str = "corner2",
        max_episode_steps: int | None = None,
    ):
        _check_name(env_name)
        self.env_name = env_name
        self.image = image
        self.image_size = int(image_size)
        self.camera = camera
        self._mw = _make_raw_env(env_name)
        self.fps = 1.0 / (self._mw.frame_skip * self._mw.model.opt.timestep)
        self.metadata = {**self.metadata, "render_fps": self.fps}
        self.render_mode = "rgb_array"
        self.max_episode_steps = int(max_episode_steps or type(self._mw).max_path_length)
        self._t = 0
        self._raw: np.ndarray | None = None
        self._renderer: mujoco.Renderer | None = None

        self._cam_id = mujoco.mj_name2id(self._mw.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if self._cam_id < 0:
            cams = [self._mw.model.camera(i).name for i in range(self._mw.model.ncam)]
            raise ValueError(f"unknown camera {camera!r}; cameras: {cams}")
        # Several metaworld cameras (corner, corner2, corner3, corner4) are mounted upside down: their
        # image "up" axis points down in the world. Those frames get rotated by 180 degrees (a proper
        # rotation, so the picture is not mirrored).
        cam_up = self._mw.data.cam_xmat[self._cam_id].reshape(3, 3)[:, 1]
        self._rotate180 = bool(cam_up[2] < 0)

        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        if image:
            s = self.image_size
            self.observation_space = gym.spaces.Dict(
                {
                    "image": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
                    "agent_pos": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
                }
            )
        else:
            self.observation_space = gym.spaces.Dict(
                {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
            )

    # ---------------------------------------------------------------- rendering
    def _get_renderer(self) -> mujoco.Renderer:
        if self._renderer is None:
            self._renderer = make_renderer(self._mw.model, self.image_size, self.image_size)
        return self._renderer

    def render(self) -> np.ndarray:
        """The current frame from `camera`, uint8 (S, S, 3), right side up."""
        renderer = self._get_renderer()
        renderer.update_scene(self._mw.data, camera=self._cam_id)
        img = renderer.render()
        if self._rotate180:
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img)

    # ---------------------------------------------------------------- gym API
    def _obs(self) -> dict[str, np.ndarray]:
        assert self._raw is not None
        if self.image:
            return {"image": self.render(), "agent_pos": self._raw[:4].astype(np.float32)}
        return {"state": self._raw.astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # Goal/object placement comes from the inner env's np_random: seeding it makes the
            # episode a function of `seed`. Without a seed, the generator just continues.
            self._mw.seed(int(seed))
        raw, _ = self._mw.reset()
        # metaworld moves the goal site (model.site_pos) *after* its last mj_forward in reset_model,
        # so data.site_xpos still shows the previous goal sample: refresh it as step() does.
        mujoco.mj_forward(self._mw.model, self._mw.data)
        for site in self._mw._target_site_config:
            self._mw._set_pos_site(*site)
        self._raw = np.asarray(raw, dtype=np.float64).copy()
        self._t = 0
        info = {"is_success": False, "expert_obs": self._raw.copy()}
        return self._obs(), info

    def step(self, action):
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(ACTION_DIM), -1.0, 1.0)
        raw, reward, _, _, mw_info = self._mw.step(action)
        self._raw = np.asarray(raw, dtype=np.float64).copy()
        self._t += 1
        info = dict(mw_info)
        info["is_success"] = bool(mw_info["success"])
        info["expert_obs"] = self._raw.copy()
        truncated = self._t >= self.max_episode_steps
        return self._obs(), float(reward), False, truncated, info

    def close(self):
        if self._renderer is not None:
            close_renderer(self._renderer)
            self._renderer = None
        self._mw.close()


class MetaWorldExpert:
    """Metaworld's scripted policy for one task, as an `Expert`. Stateless: acts on info['expert_obs']."""

    def __init__(self, env_name: str):
        _check_name(env_name)
        self.env_name = env_name
        self._policy = policy_class(env_name)()

    def reset(self, seed: int) -> None:
        pass  # the scripted policies are memoryless

    def act(self, obs: dict[str, np.ndarray], info: dict[str, Any]) -> np.ndarray:
        raw = np.asarray(info["expert_obs"], dtype=np.float64)
        with warnings.catch_warnings():
            # `metaworld.policies.policy.move` warns whenever a gain saturates; that is expected.
            warnings.simplefilter("ignore")
            action = self._policy.get_action(raw)
        return np.clip(np.asarray(action, dtype=np.float32).reshape(ACTION_DIM), -1.0, 1.0)


def policy_class(env_name: str) -> type:
    """The metaworld scripted policy class for `env_name`."""
    _check_name(env_name)
    import metaworld.policies as mwp

    cls = getattr(mwp, "ENV_POLICY_MAP", {}).get(env_name)
    if cls is None:  # naming convention: 'push-back-v3' -> SawyerPushBackV3Policy
        camel = "".join(p.capitalize() for p in re.sub(r"-v3$", "", env_name).split("-"))
        cls = getattr(mwp, f"Sawyer{camel}V3Policy", None)
    if cls is None:
        raise ValueError(f"no scripted metaworld policy for {env_name!r}")
    return cls


def make_metaworld_task(
    env_name: str,
    image: bool = False,
    image_size: int = 84,
    camera: str = "corner2",
    max_episode_steps: int | None = None,
) -> Task:
    """A `Task` for any Meta-World v3 env name, e.g. 'push-v3' -> `metaworld_push[_image]`."""
    _check_name(env_name)
    fps, default_steps = _env_constants(env_name)
    steps = int(max_episode_steps or default_steps)
    if image:
        keys = {
            "image": KeySpec((image_size, image_size, 3), "uint8", "rgb"),
            "agent_pos": KeySpec((4,), "float32", "low_dim"),
        }
    else:
        keys = {"state": KeySpec((STATE_DIM,), "float32", "low_dim")}
    keys["action"] = KeySpec((ACTION_DIM,), "float32", "action")

    return Task(
        name=task_name(env_name, image),
        keys=keys,
        make_env=functools.partial(
            MetaWorldEnv,
            env_name,
            image=image,
            image_size=image_size,
            camera=camera,
            max_episode_steps=steps,
        ),
        make_expert=functools.partial(MetaWorldExpert, env_name),
        max_episode_steps=steps,
        fps=fps,
        action_low=-np.ones(ACTION_DIM, dtype=np.float32),
        action_high=np.ones(ACTION_DIM, dtype=np.float32),
    )
