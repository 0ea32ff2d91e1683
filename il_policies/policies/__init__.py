"""Policies: the interface (`base`), their configs (`config`), the lazy registry, one module per policy.

Adding a policy means adding its module here and its name to `registry.POLICY_MODULES`.
"""

from il_policies.policies.base import Policy
from il_policies.policies.config import ActionWindow, PolicyConfig, TrainingPreset
from il_policies.policies.registry import available_policies, load_policy, make_policy, register_policy

__all__ = [
    "ActionWindow", "Policy", "PolicyConfig", "TrainingPreset", "available_policies", "load_policy", "make_policy",
    "register_policy",
]
