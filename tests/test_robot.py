"""The policy as a robot backend: load_policy, numpy observations, the control loop, the server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from il_policies import load_policy
from il_policies.policies.observations import ObservationError
from il_policies.robot import run_control_loop
from il_policies.serving.client import PolicyClient, PolicyServerError
from il_policies.serving.protocol import pack, unpack
from il_policies.serving.server import PolicyServer
from il_policies.training import Workspace
from tests.conftest import REPO, make_cfg


def _train(store, out, extra=()):
    cfg = make_cfg(["policy=bc", "policy.hidden_dims=[32,32]", "policy.vision.conv_channels=[8,16]", "policy.vision.feature_dim=16",
                    f"task.dataset_path={store}", "training.steps=5", "training.batch_size=8", *extra])
    workspace = Workspace(cfg, out)
    workspace.run()
    return workspace, out / "checkpoints" / "latest.pt"


@pytest.fixture(scope="module")
def chunked_checkpoint(linear_store, tmp_path_factory):
    """A BC policy that predicts 4-step chunks and executes them all (so episode state matters)."""
    return _train(linear_store, tmp_path_factory.mktemp("chunked"), ["policy.horizon=4", "policy.n_action_steps=4"])[1]


@pytest.fixture(scope="module")
def image_checkpoint(image_store, tmp_path_factory):
    return _train(image_store, tmp_path_factory.mktemp("image"))


def test_numpy_in_numpy_out_equals_the_trained_policy(image_checkpoint):
    workspace, checkpoint = image_checkpoint
    policy = load_policy(checkpoint)
    sample = workspace.dataset[3]["obs"]
    robot_obs = {"state": sample["state"][-1].astype(np.float64), "image": sample["image"][-1]}  # HWC uint8, float64 state
    action = policy.select_action(robot_obs)
    assert isinstance(action, np.ndarray) and action.shape == (3,) and np.isfinite(action).all()
    trained = workspace.policy.eval()
    trained.reset()
    expected = trained.select_action({key: torch.as_tensor(value)[None] for key, value in robot_obs.items()})
    np.testing.assert_allclose(action, expected[0].numpy(), rtol=1e-5, atol=1e-6)
    # the same image as float CHW in [0, 1] gives the same action
    policy.reset()
    chw = {"state": robot_obs["state"], "image": robot_obs["image"].transpose(2, 0, 1).astype(np.float32) / 255}
    np.testing.assert_allclose(policy.select_action(chw), action, rtol=1e-5, atol=1e-6)
    assert policy.metadata["observations"]["image"] == {"shape": [3, 24, 24], "kind": "rgb"}


def test_actions_are_clipped_to_the_recorded_bounds(image_checkpoint):
    policy = load_policy(image_checkpoint[1])
    data_low = np.asarray(policy.checkpoint_meta["task"]["data_action_low"])
    np.testing.assert_allclose(policy.action_low.numpy(), data_low, rtol=1e-6)
    policy.set_action_bounds([-0.01] * 3, [0.01] * 3)
    obs = {"state": np.full(5, 50.0), "image": np.zeros((24, 24, 3), np.uint8)}  # far outside the data: large actions
    assert np.abs(policy.select_action(obs)).max() <= 0.01


@pytest.mark.parametrize(
    "obs, message",
    [
        ({"image": np.zeros((24, 24, 3), np.uint8)}, r"\['state'\] are missing"),
        ({"state": np.zeros(4), "image": np.zeros((24, 24, 3), np.uint8)}, r"'state' has shape \(4,\); expected \(5,\)"),
        ({"state": np.zeros(5), "image": np.zeros((20, 24, 3), np.uint8)}, r"'image' has shape \(20, 24, 3\); expected \(24, 24, 3\) \(HWC\)"),
        ({"state": np.zeros(5), "image": np.zeros((24, 24, 3), np.int16)}, r"'image' has dtype int16"),
        ({"state": np.array(["a"] * 5), "image": np.zeros((24, 24, 3), np.uint8)}, r"'state' has dtype <U1"),
        ({"state": np.array([0, 1, np.nan, 0, 0]), "image": np.zeros((24, 24, 3), np.uint8)}, r"'state' contains NaN"),
        ({"state": np.zeros((2, 5)), "image": np.zeros((24, 24, 3), np.uint8)}, r"some observations have a batch dimension"),
    ],
)
def test_bad_observations_are_rejected_with_a_message(image_checkpoint, obs, message):
    policy = load_policy(image_checkpoint[1])
    with pytest.raises(ObservationError, match=message):
        policy.select_action(obs)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_checkpoint_is_one_sentence(chunked_checkpoint, tmp_path, keep):
    from il_policies.checkpoint import CheckpointError

    data = chunked_checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])  # a copy interrupted part-way
    with pytest.raises(CheckpointError) as e:
        load_policy(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)


def test_predict_action_chunk_for_callers_that_schedule_chunks(chunked_checkpoint):
    policy = load_policy(chunked_checkpoint)
    chunk = policy.predict_action_chunk({"state": np.ones(5)})
    assert chunk.shape == (4, 3)
    policy.reset()
    actions = [policy.select_action({"state": np.ones(5)}) for _ in range(4)]
    np.testing.assert_allclose(np.stack(actions), chunk, rtol=1e-6)


def test_load_policy_needs_no_training_code(chunked_checkpoint):
    # In a fresh process, which also checks that num_threads sets the process's torch threads.
    code = (
        "import sys, torch; from il_policies import load_policy; import numpy as np\n"
        f"p = load_policy({str(chunked_checkpoint)!r}, num_threads=1); p.select_action({{'state': np.zeros(5)}})\n"
        "heavy = [m for m in ('hydra', 'wandb', 'diffusers', 'zarr', 'il_policies.training', 'il_policies.envs') if m in sys.modules]\n"
        "print(heavy, torch.get_num_threads())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[] 1"


def test_control_loop_reports_latency_and_deadline_misses(chunked_checkpoint):
    policy = load_policy(chunked_checkpoint)
    sent = []
    report = run_control_loop(policy, lambda: {"state": np.zeros(5)}, sent.append, rate_hz=50, n_steps=10)
    assert report.n_steps == 10 and len(sent) == 10 and report.deadline_misses == 0 and report.missed_steps == ()
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms

    class Slow:
        def reset(self):
            pass

        def select_action(self, obs):
            time.sleep(0.03)
            return np.zeros(3)

    slow = run_control_loop(Slow(), dict, lambda a: None, rate_hz=100, n_steps=5)
    assert slow.deadline_misses == 5 and slow.missed_steps == (0, 1, 2, 3, 4) and slow.latency_p50_ms >= 30


@pytest.fixture()
def server(chunked_checkpoint):
    server = PolicyServer(load_policy(chunked_checkpoint), port=0, max_message_bytes=1 << 16).start_in_thread()
    yield server
    server.stop()


def test_server_round_trip_matches_the_local_policy(server, chunked_checkpoint):
    local = load_policy(chunked_checkpoint)
    with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        assert client.metadata()["action_dim"] == 3
        client.reset()
        obs = {"state": np.linspace(0, 1, 5)}
        np.testing.assert_allclose(client.select_action(obs), local.select_action(obs), rtol=1e-6)
        np.testing.assert_allclose(client.predict_action_chunk(obs), local.predict_action_chunk(obs), rtol=1e-6)
        with pytest.raises(PolicyServerError, match="'state' has shape"):
            client.select_action({"state": np.zeros(7)})


def test_malformed_requests_get_an_error_and_the_server_keeps_serving(server):
    with connect(f"ws://127.0.0.1:{server.port}") as socket:
        socket.send(b"\xc1 not msgpack")
        reply = unpack(socket.recv(timeout=10))
        assert reply["ok"] is False and "not a valid msgpack message" in reply["error"]
        socket.send(pack({"method": "explode"}))
        assert "method" in unpack(socket.recv(timeout=10))["error"]
        socket.send(pack({"method": "select_action", "obs": {"state": {"__ndarray__": ["object", [5], b""]}}}))
        assert "dtype 'object'" in unpack(socket.recv(timeout=10))["error"]
        socket.send("text frame")
        assert "binary msgpack" in unpack(socket.recv(timeout=10))["error"]
        socket.send(pack({"method": "metadata"}))
        assert unpack(socket.recv(timeout=10))["ok"]
    # a message over the size bound closes that connection only
    with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as socket:
        socket.send(b"\x00" * (1 << 17))
        with pytest.raises(Exception):
            socket.recv(timeout=10)
    with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
        assert client.metadata()["policy"] == "bc"


def test_two_clients_keep_their_own_episode_state(server, chunked_checkpoint):
    local = load_policy(chunked_checkpoint)
    obs_a, obs_b = {"state": np.zeros(5)}, {"state": np.full(5, 2.0)}
    chunk_a = local.predict_action_chunk(obs_a)
    local.reset()
    chunk_b = local.predict_action_chunk(obs_b)
    results: dict[str, list] = {"a": [], "b": []}

    def drive(name, obs):
        with PolicyClient(f"ws://127.0.0.1:{server.port}") as client:
            client.reset()
            for _ in range(4):
                results[name].append(client.select_action(obs))

    threads = [threading.Thread(target=drive, args=args) for args in (("a", obs_a), ("b", obs_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    np.testing.assert_allclose(np.stack(results["a"]), chunk_a, rtol=1e-6)
    np.testing.assert_allclose(np.stack(results["b"]), chunk_b, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_serve_command_binds_loopback_and_answers(chunked_checkpoint, backend):
    process = subprocess.Popen(
        [sys.executable, "-m", "il_policies.serve", f"checkpoint={chunked_checkpoint}", "port=0", f"backend={backend}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving bc from") and f"({backend}) on ws://127.0.0.1:" in line, process.stderr.read() if not line else line
        url = line.strip().split(" on ")[-1]
        obs = {"state": np.linspace(-1, 1, 5)}
        with PolicyClient(url) as client:
            np.testing.assert_allclose(client.select_action(obs), load_policy(chunked_checkpoint).select_action(obs), rtol=1e-4, atol=2e-5)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_asynchronous_control_loop_serves_every_step_and_counts_the_waits():
    from tests.test_chunk_executor import StepPolicy

    policy, sent, steps = StepPolicy(horizon=8), [], iter(range(1000))
    observe = lambda: {"t": np.array([next(steps)], dtype=np.float32)}  # noqa: E731
    report = run_control_loop(policy, observe, sent.append, rate_hz=1000, n_steps=40, asynchronous=True, threshold=3,
                              clock=lambda: 0.0, sleep=lambda s: None)
    np.testing.assert_allclose(np.stack(sent)[:, 0], np.arange(40))  # aligned, whatever the worker's timing
    assert report.n_steps == 40 and report.stalls >= 1  # the first step waits for the first chunk
    assert not any(t.name.startswith("chunk-inference") for t in threading.enumerate())  # the worker is shut down


def test_asynchronous_client_keeps_the_plan_on_the_robot(server, chunked_checkpoint):
    local = load_policy(chunked_checkpoint)
    observations = [{"state": np.random.default_rng(t).normal(size=5)} for t in range(12)]
    local.reset()
    expected = np.stack([local.select_action(o) for o in observations])
    # threshold 1: a chunk is requested when the plan is empty, from that step's observation, as select_action does
    with PolicyClient(f"ws://127.0.0.1:{server.port}", asynchronous=True, threshold=1, blend="replace") as client:
        client.reset()
        served = np.stack([client.select_action(o) for o in observations])
        assert client._executor.stalls == 3 and client._executor.inferences == 3
    np.testing.assert_allclose(served, expected, rtol=1e-6)
    with PolicyClient(f"ws://127.0.0.1:{server.port}", asynchronous=True, rate_hz=50) as client:  # ahead of time
        client.reset()
        ahead = np.stack([client.select_action(o) for o in observations])
        assert ahead.shape == (12, 3) and np.isfinite(ahead).all() and client._executor.inferences >= 3
    assert not any(t.name.startswith("chunk-inference") for t in threading.enumerate())


def test_asynchronous_client_refuses_an_observation_history(linear_store, tmp_path):
    _, checkpoint = _train(linear_store, tmp_path, ["policy.n_obs_steps=2", "policy.horizon=4", "policy.n_action_steps=3"])
    server = PolicyServer(load_policy(checkpoint), port=0).start_in_thread()
    try:
        with pytest.raises(ValueError, match="needs a policy with n_obs_steps = 1; the server's has 2"):
            PolicyClient(f"ws://127.0.0.1:{server.port}", asynchronous=True)
    finally:
        server.stop()


def test_warm_start_runs_the_first_step_before_the_schedule():
    now = [0.0]  # a simulated clock: only the first call (the chunk) takes time, 30 ms against a 10 ms period

    class FirstCallSlow:
        def __init__(self):
            self.calls = 0

        def reset(self):
            pass

        def select_action(self, obs):
            self.calls += 1
            now[0] += 0.03 if self.calls == 1 else 0.0
            return np.zeros(3)

    def loop(policy, **options):
        return run_control_loop(policy, dict, sent.append, rate_hz=100, n_steps=5, clock=lambda: now[0],
                                sleep=lambda seconds: now.__setitem__(0, now[0] + seconds), **options)

    sent = []
    cold = loop(FirstCallSlow())
    warm_policy = FirstCallSlow()
    warm = loop(warm_policy, warm_start=True)
    assert cold.missed_steps == (0,) and warm.deadline_misses == 0 and warm_policy.calls == 6 and len(sent) == 11
