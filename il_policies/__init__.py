"""il-policies: imitation-learning policies behind one interface, one training loop, one config system.

`from il_policies import load_policy` is the robot-side entry point. Names are imported lazily so
that light tools (e.g. `python -m il_policies.data.inspect`) do not pay for importing torch.
"""

from importlib import import_module

__all__ = ["Policy", "available_policies", "load_policy", "make_policy"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("il_policies.policies"), name)
    raise AttributeError(f"module 'il_policies' has no attribute {name!r}")
