"""Demonstration generation, the shared rollout harness and its command-line entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

from il_policies.data.store import TrajectoryStore
from il_policies.envs import make_task_by_name
from il_policies.envs.demos import check_store_matches_task, generate_demos
from il_policies.rollout import EVAL_SEED_START, ExpertActor, check_policy_matches_task, eval_seeds, run_rollouts
from tests.conftest import REPO

ENV = {**os.environ, "WANDB_MODE": "disabled", "MUJOCO_GL": "egl", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def reach_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "reach.zarr"
    generate_demos(make_task_by_name("metaworld_reach"), path, 3)
    return path


def test_generation_is_deterministic_and_records_seeds(reach_store, tmp_path):
    again = generate_demos(make_task_by_name("metaworld_reach"), tmp_path / "again.zarr", 3)
    first = TrajectoryStore.open(reach_store)
    assert first.task == "metaworld_reach" and first.n_episodes == 3
    assert first.episode_seeds.tolist() == [0, 1, 2]  # the reach expert succeeds on these
    assert first.provenance["expert_successes"] == 3 and first.provenance["seeds_tried"] == 3
    for key, value in first.load().items():
        np.testing.assert_array_equal(again.load()[key], value, err_msg=key)


def test_interrupted_generation_resumes_to_the_store_an_uninterrupted_run_writes(reach_store, tmp_path, monkeypatch):
    from il_policies.data.store import StoreError
    from il_policies.training import Workspace
    from tests.conftest import make_cfg

    task, path = make_task_by_name("metaworld_reach"), tmp_path / "resumed.zarr"
    append = TrajectoryStore.append_episode

    def interrupt_at_the_third(self, episode, seed=None, provenance=None):
        if self.n_episodes == 2:
            raise KeyboardInterrupt
        return append(self, episode, seed, provenance)

    monkeypatch.setattr(TrajectoryStore, "append_episode", interrupt_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        generate_demos(task, path, 3)
    monkeypatch.undo()
    partial = TrajectoryStore.open(path)
    assert partial.n_episodes == 2 and partial.provenance["complete"] is False
    plain = [f"task.dataset_path={path}", "policy=bc", "policy.hidden_dims=[8]", "training.steps=2", "training.batch_size=4"]
    with pytest.raises(ValueError, match="incomplete: its generation stopped at 2 of 3 episodes"):
        Workspace(make_cfg(plain), tmp_path / "plain").run()  # task=dataset: no expert to finish it with
    # train.py on the simulated task finishes the generation it finds interrupted, then trains
    Workspace(make_cfg([*plain, "task=metaworld_reach", "eval.n_episodes=0"]), tmp_path / "run").run()
    resumed, first = TrajectoryStore.open(path), TrajectoryStore.open(reach_store)
    assert resumed.provenance == first.provenance and first.provenance["complete"] is True
    assert resumed.episode_seeds.tolist() == first.episode_seeds.tolist()
    for key, value in first.load().items():
        np.testing.assert_array_equal(resumed.load()[key], value, err_msg=key)
    assert generate_demos(task, path, 3).n_episodes == 3  # the same command on a complete store: nothing to do
    with pytest.raises(StoreError, match="generated for 3 episodes of metaworld_reach from seed 0 but this run asks "
                                         "for 4 episodes of metaworld_reach from seed 0 \\(differing: n_episodes\\)"):
        generate_demos(task, path, 4)


def test_only_successful_episodes_are_kept_unless_asked(tmp_path):
    # 10 steps are too few for the reach expert (it needs ~45): every episode fails.
    task = make_task_by_name("metaworld_reach", max_episode_steps=10)
    with pytest.raises(RuntimeError, match="succeeded on only 0 of 4 seeds"):
        generate_demos(task, tmp_path / "none.zarr", 2, max_attempts=4)
    store = generate_demos(task, tmp_path / "failures.zarr", 2, keep_failures=True)
    assert store.n_episodes == 2 and store.episode_lengths.tolist() == [10, 10]
    assert store.provenance["expert_successes"] == 0


def test_evaluation_seeds_never_overlap_demonstration_seeds(reach_store):
    demo_seeds = set(TrajectoryStore.open(reach_store).episode_seeds.tolist())
    assert not demo_seeds & set(eval_seeds(500))
    assert min(eval_seeds(5)) == EVAL_SEED_START
    with pytest.raises(ValueError, match="below the evaluation seeds"):
        generate_demos(make_task_by_name("metaworld_reach"), "unused.zarr", 3, seed_start=EVAL_SEED_START - 5)


def test_evaluation_episodes_run_on_distinct_consecutive_seeds():
    assert eval_seeds(4, start=10) == [10, 11, 12, 13] and len(set(eval_seeds(500))) == 500
    task = make_task_by_name("metaworld_reach", max_episode_steps=5)
    _, episodes = run_rollouts(task, ExpertActor(task, 2), eval_seeds(3), n_envs=2, record=True, progress=False)
    starts = [episode["state"][0] for episode in episodes]  # each seed places the goal elsewhere
    assert all(not np.allclose(starts[i], starts[j]) for i in range(3) for j in range(i + 1, 3))


def test_sync_and_async_vector_envs_give_the_same_episodes():
    task = make_task_by_name("metaworld_reach")
    seeds = eval_seeds(3)
    sync, _ = run_rollouts(task, ExpertActor(task, 2), seeds, n_envs=2, progress=False)
    asynchronous, _ = run_rollouts(task, ExpertActor(task, 2), seeds, n_envs=2, asynchronous=True, progress=False)
    assert sync.successes == asynchronous.successes == [True, True, True]
    assert sync.lengths == asynchronous.lengths
    np.testing.assert_allclose(sync.returns, asynchronous.returns)
    one_env, _ = run_rollouts(task, ExpertActor(task, 1), seeds, n_envs=1, progress=False)
    assert one_env.lengths == sync.lengths  # a seed gives the same episode in any wave layout


def test_aloha_expert_through_the_harness():
    task = make_task_by_name("aloha_transfer_cube")
    result, episodes = run_rollouts(task, ExpertActor(task, 2), [0, 1], n_envs=2, record=True, progress=False)
    assert result.successes == [True, True]
    assert episodes[0]["action"].shape == (result.lengths[0], 14) and episodes[0]["env_state"].shape[1] == 7


def test_video_is_written_and_readable(tmp_path):
    task = make_task_by_name("metaworld_reach")
    result, _ = run_rollouts(task, ExpertActor(task, 2), eval_seeds(2), n_envs=2, video_dir=tmp_path, n_videos=1, progress=False)
    assert len(result.videos) == 1
    frames = imageio.mimread(result.videos[0])
    assert len(frames) == result.lengths[0] + 1  # the reset frame and one per step
    assert frames[0].ndim == 3 and frames[0].shape[2] == 3 and np.asarray(frames[0]).std() > 0
    summary = json.loads(result.write_json(tmp_path / "metrics.json").read_text())
    assert summary["success_rate"] == 1.0 and summary["seeds"] == eval_seeds(2)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'metaworld_fly'; known tasks: ") as error:
        make_task_by_name("metaworld_fly")
    assert "metaworld_push_image" in str(error.value) and "aloha_transfer_cube_image" in str(error.value)
    with pytest.raises(ValueError, match=r"unknown task 'aloha_juggle'.*aloha_insertion"):
        make_task_by_name("aloha_juggle")


def test_dataset_for_another_task_or_variant_is_refused(reach_store):
    store = TrajectoryStore.open(reach_store)
    with pytest.raises(ValueError, match="generated for task 'metaworld_reach', but the config asks for 'metaworld_push'"):
        check_store_matches_task(store, make_task_by_name("metaworld_push"))
    reach_image = make_task_by_name("metaworld_reach_image")
    with pytest.raises(ValueError, match="generated for task 'metaworld_reach', but the config asks for 'metaworld_reach_image'"):
        check_store_matches_task(store, reach_image)


def test_rollout_refuses_a_policy_with_other_observation_keys():
    meta = {"obs": {"state": {"shape": (39,), "kind": "low_dim"}}, "action": {"shape": (4,)}}
    check_policy_matches_task(meta, make_task_by_name("metaworld_reach"))
    with pytest.raises(ValueError, match=r"expects observation keys \['state'\] but task 'metaworld_reach_image' provides \['agent_pos', 'image'\]"):
        check_policy_matches_task(meta, make_task_by_name("metaworld_reach_image"))
    image_meta = {"obs": {"agent_pos": {"shape": (4,), "kind": "low_dim"}, "image": {"shape": (3, 64, 64), "kind": "rgb"}}, "action": {"shape": (4,)}}
    with pytest.raises(ValueError, match=r"different shapes: image \[3, 64, 64\] vs \[3, 84, 84\]"):
        check_policy_matches_task(image_meta, make_task_by_name("metaworld_reach_image"))


def test_expert_through_the_rollout_cli(tmp_path):
    run = subprocess.run(
        [sys.executable, "eval/rollout.py", "policy=expert", "task=metaworld_reach", "n_episodes=2", "n_videos=1",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["success_rate"] == 1.0 and summary["n_episodes"] == 2
    assert (tmp_path / "metrics.json").is_file() and len(list((tmp_path / "videos").glob("*.mp4"))) == 1


@pytest.mark.slow
def test_generate_train_bc_and_roll_out_on_metaworld(tmp_path):
    """The whole pipeline on a real task: train.py generates the missing dataset, trains BC and
    evaluates it; eval/rollout.py then re-evaluates the checkpoint on its own."""
    dataset = tmp_path / "push.zarr"
    run = subprocess.run(
        [sys.executable, "train.py", "policy=bc", "task=metaworld_push", f"task.dataset_path={dataset}", "task.n_demos=30",
         "training.steps=1500", "eval.n_episodes=20", "logger.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"dataset {dataset} not found: generating 30 demonstrations" in run.stdout + run.stderr
    summary = dict(item.split("=", 1) for item in run.stdout.strip().splitlines()[-1].split())
    assert float(summary["eval/success_rate"]) >= 0.8, summary  # measured 1.0 on this machine

    rollout = subprocess.run(
        [sys.executable, "eval/rollout.py", f"checkpoint={tmp_path / 'run/checkpoints/best.pt'}", "n_episodes=10",
         "n_videos=0", f"hydra.run.dir={tmp_path / 'rollout'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert rollout.returncode == 0, rollout.stderr[-3000:]
    assert json.loads(rollout.stdout.strip().splitlines()[-1])["success_rate"] >= 0.8

    delayed = subprocess.run(  # asynchronous execution with chunks arriving one step late
        [sys.executable, "eval/rollout.py", f"checkpoint={tmp_path / 'run/checkpoints/best.pt'}", "n_episodes=10",
         "n_videos=0", "latency_steps=1", "blend=replace", f"hydra.run.dir={tmp_path / 'delayed'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert delayed.returncode == 0, delayed.stderr[-3000:]
    summary = json.loads(delayed.stdout.strip().splitlines()[-1])
    assert summary["latency_steps"] == 1 and summary["chunk_boundaries"] > 10 and summary["boundary_jump_max"] >= 0
    assert json.loads((tmp_path / "delayed" / "metrics.json").read_text())["blend"] == "replace"


def test_workspace_evaluates_periodically_through_the_harness(reach_store, tmp_path):
    from il_policies.checkpoint import read_checkpoint
    from il_policies.training import Workspace
    from tests.conftest import make_cfg

    cfg = make_cfg([
        "policy=bc", "policy.hidden_dims=[16]", "task=metaworld_reach", f"task.dataset_path={reach_store}",
        "+task.env_options.max_episode_steps=30", "training.steps=4", "training.batch_size=8",
        "eval.every=2", "eval.n_episodes=2", "eval.n_videos=1",
    ])
    summary = Workspace(cfg, tmp_path).run()
    assert summary["eval/n_episodes"] == 2
    for step in (2, 4):
        metrics = json.loads((tmp_path / "eval" / f"step_{step}" / "metrics.json").read_text())
        assert metrics["seeds"] == [1_000_000, 1_000_001] and len(metrics["lengths"]) == 2
        # a BC policy 4 steps into training does not reach the goal: every episode runs to the step limit
        assert metrics["successes"] == [False, False] and metrics["lengths"] == [30, 30]
        assert len(list((tmp_path / "eval" / f"step_{step}").glob("*.mp4"))) == 1
    assert summary["eval/success_rate"] == 0.0 and summary["eval/mean_length"] == 30
    best = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert "eval/success_rate" in best["metrics"] and best["task_meta"]["env_name"] == "reach-v3"


def test_asynchronous_chunks_in_simulation(reach_store, tmp_path):
    """The harness runs a policy through one ChunkExecutor per env: with no latency it is the
    synchronous policy step for step; with a simulated latency it runs and reports chunk joins."""
    from il_policies.chunk_executor import ChunkExecutorActor
    from il_policies.rollout import PolicyActor
    from il_policies.training import Workspace
    from tests.conftest import make_cfg

    cfg = make_cfg(["policy=bc", "policy.hidden_dims=[16]", "policy.horizon=4", "policy.n_action_steps=4", "task=metaworld_reach",
                    f"task.dataset_path={reach_store}", "training.steps=20", "training.batch_size=8", "eval.n_episodes=0"])
    workspace = Workspace(cfg, tmp_path)
    workspace.run()
    policy, task, seeds = workspace.policy, make_task_by_name("metaworld_reach", max_episode_steps=60), eval_seeds(2)
    synchronous, _ = run_rollouts(task, PolicyActor(policy), seeds, n_envs=2)
    unhurried, _ = run_rollouts(task, ChunkExecutorActor(policy, 2, latency_steps=0, blend="replace", threshold=1), seeds, n_envs=2)
    # the same actions up to float rounding (the synchronous actor runs both envs in one batch of 2)
    assert unhurried.returns == pytest.approx(synchronous.returns, rel=1e-4) and unhurried.lengths == synchronous.lengths
    delayed_actor = ChunkExecutorActor(policy, 2, latency_steps=2, blend="linear")
    delayed, _ = run_rollouts(task, delayed_actor, seeds, n_envs=2)
    assert delayed.n_episodes == 2 and delayed.returns != pytest.approx(synchronous.returns, rel=1e-3)  # the chunks came later
    assert len(delayed_actor.boundary_jumps) >= 2 * (60 // 4 - 1) and all(j >= 0 for j in delayed_actor.boundary_jumps)
