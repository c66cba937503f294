"""The Flax models (public path of :mod:`eqco_jax.core.models`): ResNet
backbones, projection heads, encoders, BatchNorm over the global batch or
per group."""

from eqco_jax.core.models import BasicBlock
from eqco_jax.core.models import BatchNorm
from eqco_jax.core.models import Bottleneck
from eqco_jax.core.models import create_backbone
from eqco_jax.core.models import create_encoder
from eqco_jax.core.models import create_head
from eqco_jax.core.models import DTYPES
from eqco_jax.core.models import Encoder
from eqco_jax.core.models import group_moments
from eqco_jax.core.models import HEADS
from eqco_jax.core.models import LAYOUTS
from eqco_jax.core.models import LinearClassifier
from eqco_jax.core.models import ProjectionHead
from eqco_jax.core.models import ResidualBlock
from eqco_jax.core.models import ResNet

__all__ = [
    "BasicBlock", "BatchNorm", "Bottleneck", "DTYPES", "Encoder", "HEADS",
    "LAYOUTS", "LinearClassifier", "ProjectionHead", "ResNet", "ResidualBlock",
    "create_backbone", "create_encoder", "create_head", "group_moments",
]
