"""Training: the one Workspace for every policy, distributed helpers and logging."""

from il_policies.training.workspace import NonFiniteLossError, Workspace

__all__ = ["NonFiniteLossError", "Workspace"]
