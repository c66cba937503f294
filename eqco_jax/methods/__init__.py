"""What differs between SiMo and MoCo v2: where negatives come from, and how."""

from eqco_jax.methods import mocov2
from eqco_jax.methods import simo

METHODS = ("simo", "mocov2")
