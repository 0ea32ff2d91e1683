"""il_policies/chunk_executor.py: latency compensation, blending, errors and shutdown, by step
counts (a simulated latency) or by waiting on the worker, never by wall-clock timing."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from il_policies.chunk_executor import ChunkExecutor, blend_weights


class StepPolicy:
    """A stand-in whose chunk requested at step t predicts, for step t + k, the action
    [t + k, request id]: a correctly aligned plan serves action[0] == its step."""

    def __init__(self, horizon: int = 10, fail_on: int | None = None):
        self.horizon, self.fail_on = horizon, fail_on
        self.requests, self.observed = 0, []

    def reset(self):
        self.observed = []

    def observe(self, obs):
        self.observed.append(int(obs["t"][0]))
        return {"t": torch.tensor([[[float(obs["t"][0])]]])}  # (B=1, n_obs_steps=1, 1)

    def predict_action_chunk(self, model_obs):
        self.requests += 1
        if self.fail_on == self.requests:
            raise ValueError("the network broke")
        t = model_obs["t"][0, -1, 0]
        steps = t + torch.arange(self.horizon, dtype=torch.float32)
        return torch.stack([steps, torch.full_like(steps, self.requests)], dim=-1)[None]  # (1, horizon, 2)


def run(executor, n_steps):
    return np.stack([executor.select_action({"t": np.array([t], dtype=np.float32)}) for t in range(n_steps)])


@pytest.mark.parametrize("blend", ["replace", "linear", "ensemble"])
@pytest.mark.parametrize("latency", [0, 1, 3, 4])
def test_skipped_actions_match_the_elapsed_steps(blend, latency):
    # one inference at a time keeps up when a chunk outlasts two latencies: horizon >= 2 * latency + 1
    policy = StepPolicy(horizon=10)
    with ChunkExecutor(policy, latency_steps=latency, blend=blend) as executor:
        actions = run(executor, 60)
    np.testing.assert_allclose(actions[:, 0], np.arange(60))  # every served action is for its own step
    assert executor.stalls == (latency > 0)  # only the first step waits: the threshold is latency + 1
    assert policy.observed == list(range(60))  # every observation reached the history
    assert executor.threshold == latency + 1 and executor.stale_chunks == 0


def test_a_latency_longer_than_the_plan_stalls_and_still_serves_the_right_step():
    policy = StepPolicy(horizon=4)
    with ChunkExecutor(policy, latency_steps=3, threshold=1) as executor:  # requested only when the plan is empty
        actions = run(executor, 12)
    np.testing.assert_allclose(actions[:, 0], np.arange(12))
    assert executor.stalls == 3  # steps 0, 4, 8 wait for their chunk


def test_replace_never_serves_an_action_of_a_replaced_chunk():
    policy = StepPolicy(horizon=10)
    with ChunkExecutor(policy, latency_steps=2, blend="replace", threshold=6) as executor:
        actions = run(executor, 40)
    request = actions[:, 1]
    assert (np.diff(request) >= 0).all()  # once a newer chunk is in, no older one's action comes back
    assert len(set(request)) == executor.inferences - (executor._pending is not None)  # every chunk taken in was served


def test_blend_weights_sum_to_one_and_linear_fades_in():
    np.testing.assert_allclose(blend_weights(4, "linear"), [0.2, 0.4, 0.6, 0.8])
    assert (blend_weights(3, "replace") == 1).all()
    # ensemble: the new prediction is the c-th of its step; blending one prediction at a time must give
    # ACT's average with weights exp(-k j), j = 0 for the oldest
    k, predictions = 0.3, np.array([1.0, 5.0, -2.0, 7.0])
    plan = predictions[0]
    for c in range(1, len(predictions)):
        w = blend_weights(1, "ensemble", np.array([c]), k)[0]
        plan = (1 - w) * plan + w * predictions[c]
    weights = np.exp(-k * np.arange(4.0))
    assert plan == pytest.approx((weights * predictions).sum() / weights.sum())
    assert blend_weights(1, "ensemble", np.array([1]), 0.0)[0] == pytest.approx(0.5)  # k = 0: a plain mean


def test_the_ensemble_plan_is_the_weighted_average_of_every_chunk_for_its_step():
    class Constant(StepPolicy):  # chunk r predicts the value r for every step (latency compensation aside)
        def predict_action_chunk(self, model_obs):
            self.requests += 1
            return torch.full((1, self.horizon, 1), float(self.requests))

    policy = Constant(horizon=6)
    with ChunkExecutor(policy, latency_steps=0, blend="ensemble", threshold=6, ensemble_coeff=0.5) as executor:
        actions = run(executor, 3)
    # a chunk every step (threshold = horizon): step s holds predictions 1..s+1 of chunks 1..s+1
    for s in range(3):
        w = np.exp(-0.5 * np.arange(s + 1))
        assert actions[s][0] == pytest.approx((w * np.arange(1, s + 2)).sum() / w.sum(), rel=1e-6)


def test_a_worker_exception_surfaces_on_a_later_call_in_one_sentence():
    policy = StepPolicy(horizon=3, fail_on=2)
    with ChunkExecutor(policy, threshold=1) as executor:  # a real worker thread; the plan empties, so the step waits
        run(executor, 3)
        with pytest.raises(RuntimeError, match=r"^the background inference of the chunk requested at step 3 failed: ValueError: the network broke$"):
            executor.select_action({"t": np.array([3.0], dtype=np.float32)})
    simulated = ChunkExecutor(StepPolicy(horizon=3, fail_on=2), latency_steps=1, threshold=1)
    run(simulated, 3)
    with pytest.raises(RuntimeError, match="requested at step 3 failed: ValueError"):
        simulated.select_action({"t": np.array([3.0], dtype=np.float32)})


def test_the_worker_thread_serves_in_order_and_shuts_down():
    policy = StepPolicy(horizon=8)
    executor = ChunkExecutor(policy, rate_hz=50)
    actions = run(executor, 30)
    np.testing.assert_allclose(actions[:, 0], np.arange(30))  # whatever the timing, steps stay aligned
    assert any(t.name.startswith("chunk-inference") for t in threading.enumerate())
    executor.close()
    assert not any(t.name.startswith("chunk-inference") for t in threading.enumerate())


def test_the_threshold_follows_the_measured_latency():
    ticks = iter(np.arange(0.0, 100.0, 0.05))  # each clock reading 50 ms after the previous one
    executor = ChunkExecutor(StepPolicy(), rate_hz=50, latency_steps=None, clock=lambda: float(next(ticks)))
    run(executor, 1)  # one inference measured: 50 ms at 50 Hz is 2.5 steps
    assert executor.threshold == math.ceil(1.5 * 0.05 * 50) + 1
    executor.close()


def test_reset_starts_a_new_episode():
    policy = StepPolicy(horizon=5)
    with ChunkExecutor(policy, latency_steps=2) as executor:
        run(executor, 7)
        executor.reset()
        assert executor.step == 0 and policy.observed == []
        np.testing.assert_allclose(run(executor, 4)[:, 0], np.arange(4))


def test_bad_options_are_one_sentence():
    with pytest.raises(ValueError, match="blend must be one of replace, linear, ensemble"):
        ChunkExecutor(StepPolicy(), latency_steps=1, blend="average")
    with pytest.raises(ValueError, match="give rate_hz"):
        ChunkExecutor(StepPolicy())


def test_with_no_latency_it_serves_what_select_action_serves():
    from il_policies import make_policy

    meta = {"obs": {"state": {"shape": (3,), "kind": "low_dim"}}, "action": {"shape": (2,)}}
    policy = make_policy({"name": "bc", "hidden_dims": [8], "horizon": 4, "n_action_steps": 4}, meta)
    policy.normalizer.fit({"state": np.random.default_rng(0).normal(size=(20, 3)), "action": np.random.default_rng(1).normal(size=(20, 2))})
    observations = [{"state": np.random.default_rng(t).normal(size=3).astype(np.float32)} for t in range(10)]
    policy.reset()
    expected = np.stack([policy.select_action(o) for o in observations])
    with ChunkExecutor(policy, latency_steps=0, blend="replace", threshold=1) as executor:
        executor.reset()
        served = np.stack([executor.select_action(o) for o in observations])
    np.testing.assert_allclose(served, expected, rtol=0, atol=0)
