"""Batch-1 inference threads: small ops on one thread, large products on the caller's threads."""

from __future__ import annotations

import pytest
import torch

from il_policies.nn.threads import small_ops_on_one_thread, wide


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_ops_run_on_one_thread_and_wide_products_on_all(two_threads):
    with torch.inference_mode():
        with small_ops_on_one_thread():
            assert torch.get_num_threads() == 1
            with wide():
                assert torch.get_num_threads() == 2
            with wide(worth_it=False):  # a product too small to gain from a second thread
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
            with small_ops_on_one_thread():  # nested: still one thread, and wide() still knows the caller's count
                with wide():
                    assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with wide():  # outside: nothing changes
            assert torch.get_num_threads() == 2


def test_training_and_errors_keep_the_callers_threads(two_threads):
    with small_ops_on_one_thread():  # autograd on: training keeps every thread
        assert torch.get_num_threads() == 2
    with torch.inference_mode(), pytest.raises(RuntimeError):
        with small_ops_on_one_thread():
            raise RuntimeError("a failing network call")
    assert torch.get_num_threads() == 2


def test_select_action_at_batch_1_leaves_the_thread_count_as_it_was(two_threads):
    from il_policies import make_policy

    meta = {"obs": {"state": {"shape": (3,), "kind": "low_dim"}}, "action": {"shape": (2,)}}
    policy = make_policy({"name": "bc", "hidden_dims": [8]}, meta).eval()
    seen = []
    predict = policy._predict_action_chunk
    policy._predict_action_chunk = lambda obs: (seen.append(torch.get_num_threads()), predict(obs))[1]
    policy.select_action({"state": torch.zeros(3)})
    policy.select_action({"state": torch.zeros(4, 3)})
    assert seen == [1, 2]  # batch 1 on one thread; a batch keeps every thread
    assert torch.get_num_threads() == 2
