"""Policies: the interface, the registry, and one module per policy.

Every module in this package other than `base` and `registry` is imported here, and registers
its policy with `@register_policy("name")`: adding a policy means adding a file.
"""

import importlib
import pkgutil

from il_policies.policies.base import Policy, PolicyConfig
from il_policies.policies.registry import available_policies, load_policy, make_policy, register_policy

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Policy", "PolicyConfig", "available_policies", "load_policy", "make_policy", "register_policy"]
