"""Policies: the interface, the registry and one module per policy (imported here to register)."""

from il_policies.policies import bc  # noqa: F401  (registers "bc")
from il_policies.policies.base import Policy, PolicyConfig
from il_policies.policies.registry import available_policies, load_policy, make_policy, register_policy

__all__ = ["Policy", "PolicyConfig", "available_policies", "load_policy", "make_policy", "register_policy"]
