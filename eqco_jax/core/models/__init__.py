"""Flax models of eqco-jax: ResNet backbones, projection heads, encoders."""

from eqco_jax.core.models.batch_norm import BatchNorm
from eqco_jax.core.models.batch_norm import group_moments
from eqco_jax.core.models.encoder import create_encoder
from eqco_jax.core.models.encoder import Encoder
from eqco_jax.core.models.heads import create_head
from eqco_jax.core.models.heads import HEADS
from eqco_jax.core.models.heads import LinearClassifier
from eqco_jax.core.models.heads import ProjectionHead
from eqco_jax.core.models.resnet import BasicBlock
from eqco_jax.core.models.resnet import Bottleneck
from eqco_jax.core.models.resnet import create_backbone
from eqco_jax.core.models.resnet import DTYPES
from eqco_jax.core.models.resnet import LAYOUTS
from eqco_jax.core.models.resnet import ResidualBlock
from eqco_jax.core.models.resnet import ResNet

__all__ = [
    "BasicBlock", "BatchNorm", "Bottleneck", "DTYPES", "Encoder", "HEADS",
    "LAYOUTS", "LinearClassifier", "ProjectionHead", "ResNet",
    "ResidualBlock", "create_backbone", "create_encoder", "create_head",
    "group_moments",
]
