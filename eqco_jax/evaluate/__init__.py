"""Evaluation of a pretrained backbone, frozen (BatchNorm in inference mode).

Three rooms, import the one you need:

* :mod:`eqco_jax.evaluate.features`: the frozen backbone as
  ``apply_backbone(variables, images)`` and feature extraction;
* :mod:`eqco_jax.evaluate.knn`: the weighted kNN monitor;
* :mod:`eqco_jax.evaluate.linear_probe`: the linear probe (SPEC section 4)
  on features extracted once, and :mod:`eqco_jax.evaluate.linear_probe_images`
  the same probe trained image by image through the frozen backbone.

The package imports jax, flax, optax, numpy and core modules of eqco_jax
(``models``, ``sharding``, ``losses``, ``config``) only: never tensorflow,
tensorflow_datasets or clu, nor ``eqco_jax.data``, ``eqco_jax.train``,
``eqco_jax.main`` or ``eqco_jax.linear_eval``. Batches come in as dicts of
arrays (see :mod:`eqco_jax.evaluate.features`), whoever built them.
"""
