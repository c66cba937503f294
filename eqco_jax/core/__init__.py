"""The core layer: the maths and the step, what you import into your own JAX
code. Imports jax, flax, optax, numpy and ml_collections only (never
TensorFlow, tensorflow-datasets or clu), nor ``eqco_jax.data`` or
``eqco_jax.program``."""
