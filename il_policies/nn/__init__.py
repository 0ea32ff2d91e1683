"""Building blocks shared by every policy: written once here, imported by the policy files."""

from il_policies.nn.mlp import mlp
from il_policies.nn.obs_encoder import ObservationEncoder
from il_policies.nn.vision import ImageEncoder

__all__ = ["ImageEncoder", "ObservationEncoder", "mlp"]
