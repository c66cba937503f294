"""eqco-jax: EqCo and SiMo (Equivalent Rules for Contrastive Learning) in
JAX/Flax.

Three layers, each a folder that imports only from the ones before it:

* ``eqco_jax.core``: the maths and the step (losses, models, methods, train
  state and step, optimizer, mesh, evaluation); jax, flax, optax, numpy and
  ml_collections only.
* ``eqco_jax.data``: datasets and input pipelines; the only layer that
  imports TensorFlow.
* ``eqco_jax.program``: running things (the training loop, checkpoints,
  workdirs, linear evaluation, export, the command line).

The public paths stand at the top and only hand names on:
``eqco_jax.losses``, ``eqco_jax.models``, ``python -m eqco_jax.main`` and
``python -m eqco_jax.export``.
"""

__version__ = "0.1.0"
