"""What differs between SiMo and MoCo v2, behind one ``Method`` protocol.

Each method says how the keys are computed (plain, or Shuffle BN), what the
loss is (through the public :mod:`eqco_jax.losses` API) and how its extra
state, the queue, changes after a step. The train step calls these and never
asks which method it runs.
"""

from eqco_jax.core.methods.base import Method
from eqco_jax.core.methods.mocov2 import MoCoV2
from eqco_jax.core.methods.simo import SiMo

# config.method -> the method it names.
METHODS: dict[str, type[Method]] = {"simo": SiMo, "mocov2": MoCoV2}

__all__ = ["METHODS", "Method", "MoCoV2", "SiMo"]
