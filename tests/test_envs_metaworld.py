"""Meta-World adapter: expert success, seeding, observation layout, image orientation, truncation."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco
import numpy as np
import pytest

from il_policies.envs.metaworld import KNOWN_ENV_NAMES, make_metaworld_task


def _run_expert(task, seed: int, max_steps: int) -> int | None:
    """Steps until first success; returns the episode length at success, or None."""
    env, expert = task.make_env(), task.make_expert()
    try:
        obs, info = env.reset(seed=seed)
        expert.reset(seed)
        for t in range(max_steps):
            action = expert.act(obs, info)
            assert action.dtype == np.float32 and action.shape == (4,)
            assert np.all(np.abs(action) <= 1.0)
            obs, _, terminated, truncated, info = env.step(action)
            assert not terminated  # the env never terminates on success
            if info["is_success"]:
                return t + 1
            if truncated:
                return None
        return None
    finally:
        env.close()


@pytest.mark.parametrize(
    "env_name", ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "button-press-topdown-v3"]
)
def test_expert_succeeds(env_name):
    task = make_metaworld_task(env_name, max_episode_steps=200)
    lengths = [_run_expert(task, seed, max_steps=200) for seed in range(5)]
    assert sum(n is not None for n in lengths) >= 4, lengths


def test_task_metadata():
    task = make_metaworld_task("button-press-topdown-v3")
    assert task.name == "metaworld_button_press_topdown"
    assert make_metaworld_task("push-v3", image=True).name == "metaworld_push_image"
    assert task.fps == pytest.approx(80.0)
    assert task.max_episode_steps == 500
    assert task.action_key == "action" and task.obs_keys == ["state"]
    assert task.keys["state"].shape == (39,) and task.keys["action"].shape == (4,)
    np.testing.assert_array_equal(task.action_low, -np.ones(4))
    np.testing.assert_array_equal(task.action_high, np.ones(4))
    assert len(KNOWN_ENV_NAMES) == 50


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        make_metaworld_task("push-v2")
    assert "push-v3" in str(err.value) and "window-open-v3" in str(err.value)


@pytest.mark.parametrize("env_name", ["push-v3", "window-open-v3"])
def test_seed_determines_episode(env_name):
    env = make_metaworld_task(env_name).make_env()
    try:
        a, info_a = env.reset(seed=7)
        # the goal marker that gets rendered sits where the observation says the goal is
        np.testing.assert_allclose(env._mw.data.site("goal").xpos, a["state"][-3:], atol=1e-5)
        for _ in range(3):  # advance the generators; reseeding must bring back the same episode
            env.step(env.action_space.sample())
        b, _ = env.reset(seed=7)
        c, _ = env.reset(seed=8)
        d, _ = env.reset()  # unseeded reset continues the generator: a new episode
    finally:
        env.close()
    assert a["state"].dtype == np.float32 and a["state"].shape == (39,)
    np.testing.assert_array_equal(a["state"], b["state"])
    assert not np.array_equal(a["state"], c["state"])
    assert not np.array_equal(c["state"], d["state"])
    # the goal (last 3 entries) is observable and varies with the seed
    assert np.any(a["state"][-3:] != 0) and not np.array_equal(a["state"][-3:], c["state"][-3:])
    np.testing.assert_allclose(info_a["expert_obs"], a["state"], rtol=1e-6, atol=1e-6)
    assert info_a["is_success"] is False


def test_state_variant_makes_no_renderer_and_step_info():
    env = make_metaworld_task("reach-v3").make_env()
    try:
        obs, _ = env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(np.zeros(4, np.float32))
        assert set(obs) == {"state"} and env._renderer is None
        assert isinstance(info["is_success"], bool) and info["expert_obs"].shape == (39,)
        assert isinstance(reward, float) and not terminated and not truncated
    finally:
        env.close()


def test_truncation_past_metaworld_limit():
    # metaworld's own env raises on stepping past its max_path_length (500); ours must not.
    task = make_metaworld_task("reach-v3", max_episode_steps=503)
    env = task.make_env()
    try:
        for _ in range(2):  # and again after a reset
            env.reset(seed=1)
            flags = [env.step(np.zeros(4, np.float32))[3] for _ in range(503)]
            assert flags[-1] and not any(flags[:-1])
    finally:
        env.close()


def _hand_blue(env) -> None:
    """Test-only: paint the gripper (body 'hand' and its subtree) pure blue, untextured."""
    model = env._mw.model
    hand = model.body("hand").id
    in_hand = set()
    for b in range(model.nbody):
        a = b
        while a > 0 and a != hand:
            a = model.body_parentid[a]
        if a == hand:
            in_hand.add(b)
    geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] in in_hand]
    model.geom_matid[geoms] = -1
    model.geom_rgba[geoms] = (0.0, 0.0, 1.0, 1.0)


def _blue_row(img: np.ndarray) -> float:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    rows, _ = np.nonzero((b > 80) & (b > 2 * r) & (b > 2 * g))
    assert rows.size > 3, "gripper not visible"
    return rows.mean()


@pytest.mark.parametrize("camera", ["corner2", "corner"])  # both are mounted upside down in metaworld
def test_image_variant(camera):
    task = make_metaworld_task("push-v3", image=True, image_size=96, camera=camera, max_episode_steps=60)
    assert task.name == "metaworld_push_image" and task.obs_keys == ["agent_pos", "image"]
    env = task.make_env()
    try:
        obs, info = env.reset(seed=0)
        for key in task.obs_keys:
            spec = task.keys[key]
            assert obs[key].shape == spec.shape and obs[key].dtype == np.dtype(spec.dtype), key
        np.testing.assert_allclose(obs["agent_pos"], info["expert_obs"][:4], rtol=1e-6, atol=1e-6)
        img = obs["image"]
        assert img.std() > 10  # not a constant / blank frame
        np.testing.assert_array_equal(env.reset(seed=0)[0]["image"], img)
        assert not np.array_equal(env.reset(seed=1)[0]["image"], img)  # puck/goal moved

        # Right side up: driving the gripper up in the world must move it up in the image.
        env.reset(seed=0)
        _hand_blue(env)
        for _ in range(15):
            obs, *_ = env.step(np.array([0, 0, -1, -1], np.float32))
        low_z, low_row = obs["agent_pos"][2], _blue_row(obs["image"])
        for _ in range(25):
            obs, *_ = env.step(np.array([0, 0, 1, -1], np.float32))
        high_z, high_row = obs["agent_pos"][2], _blue_row(obs["image"])
        assert high_z > low_z + 0.1
        assert high_row < low_row - 3, (low_row, high_row)
    finally:
        env.close()


def test_render_settings_are_cheap():
    env = make_metaworld_task("reach-v3", image=True).make_env()
    try:
        env.reset(seed=0)
        r = env._renderer
        assert r is not None
        assert env._mw.model.vis.quality.shadowsize == 0 and env._mw.model.vis.quality.offsamples == 0
        assert not r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW]
        assert not r.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION]
    finally:
        env.close()
    assert env._renderer is None
