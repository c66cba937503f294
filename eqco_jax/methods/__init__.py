"""What differs between SiMo and MoCo v2, behind one ``Method`` protocol.

Each method says how the keys are computed (plain, or Shuffle BN), what the
loss is (through the public :mod:`eqco_jax.losses` API) and how its extra
state, the queue, changes after a step. The train step calls these and never
asks which method it runs.
"""

from eqco_jax.methods.base import Method
from eqco_jax.methods.mocov2 import MoCoV2
from eqco_jax.methods.simo import SiMo

METHODS = ("simo", "mocov2")

__all__ = ["METHODS", "Method", "MoCoV2", "SiMo"]
