"""Building blocks shared by every policy: written once here, imported by the policy files."""

from il_policies.nn.conv import ConvEncoder
from il_policies.nn.mlp import mlp
from il_policies.nn.obs_encoder import ObservationEncoder

__all__ = ["ConvEncoder", "ObservationEncoder", "mlp"]
