"""Flax models of eqco-jax: ResNet backbones, projection heads, encoders."""

from eqco_jax.models.batch_norm import BatchNorm
from eqco_jax.models.batch_norm import group_moments
from eqco_jax.models.encoder import create_encoder
from eqco_jax.models.encoder import Encoder
from eqco_jax.models.heads import create_head
from eqco_jax.models.heads import HEADS
from eqco_jax.models.heads import LinearClassifier
from eqco_jax.models.heads import MoCoV2Head
from eqco_jax.models.heads import SiMoHead
from eqco_jax.models.resnet import BasicBlock
from eqco_jax.models.resnet import Bottleneck
from eqco_jax.models.resnet import create_backbone
from eqco_jax.models.resnet import LAYOUTS
from eqco_jax.models.resnet import MODELS
from eqco_jax.models.resnet import ResNet

__all__ = [
    "BasicBlock", "BatchNorm", "Bottleneck", "Encoder", "HEADS", "LAYOUTS",
    "LinearClassifier", "MODELS", "MoCoV2Head", "ResNet", "SiMoHead",
    "create_backbone", "create_encoder", "create_head", "group_moments",
]
