"""Golden outputs: every registered policy, loaded from a stored fixed-seed checkpoint, still gives the
stored actions and loss terms. A failure means a silent numerical change or a checkpoint-format change;
if the change is intended, regenerate (`python -m tests.golden.regenerate`) and say so in the commit."""

from __future__ import annotations

import pytest
import torch

from il_policies import load_policy
from il_policies.checkpoint import read_checkpoint
from tests.golden.regenerate import GOLDEN, loss_terms, sampling_generator
from tests.test_policies import CONFIGS

# Loose enough for another CPU's float32 summation order (AVX2 vs AVX-512 kernels), tight enough for
# any change to a network or a loss.
RTOL, ATOL = 1e-4, 1e-5


def test_every_registered_config_has_a_golden_file():
    assert sorted(p.stem for p in GOLDEN.glob("*.pt")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_stored_checkpoint_gives_the_stored_actions_and_losses(name):
    path = GOLDEN / f"{name}.pt"
    golden = read_checkpoint(path)["golden"]
    policy = load_policy(path)
    torch.testing.assert_close(policy.predict_action_chunk(golden["obs"], sampling_generator()), golden["actions"], rtol=RTOL, atol=ATOL)
    terms = loss_terms(policy, golden["batch"])
    assert terms.keys() == golden["loss_terms"].keys()
    for term, value in golden["loss_terms"].items():
        assert terms[term] == pytest.approx(value, rel=RTOL, abs=ATOL), term
