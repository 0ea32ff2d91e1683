"""Launched by torchrun from test_training.py: trains, then saves this rank's parameters."""

import sys
from pathlib import Path

import torch

from il_policies.training import Workspace
from tests.conftest import make_cfg

output_dir = Path(sys.argv[1])
workspace = Workspace(make_cfg(sys.argv[2:]), output_dir)
workspace.run()
torch.save(workspace.policy.state_dict(), output_dir / f"rank{workspace.ctx.rank}.pt")
