"""Evaluation of a pretrained backbone, frozen (BatchNorm in inference mode).

Pure JAX, like the rest of the core; import the room you need:

* :mod:`eqco_jax.core.evaluate.features`: the frozen backbone as
  ``apply_backbone(variables, images)`` and feature extraction;
* :mod:`eqco_jax.core.evaluate.knn`: the weighted kNN monitor;
* :mod:`eqco_jax.core.evaluate.linear_eval_features`: the linear evaluation
  protocol (docs/method.md, section 4) on features extracted once, and
  :mod:`eqco_jax.core.evaluate.linear_eval_images` the same classifier
  trained image by image through the frozen backbone.

Batches come in as dicts of arrays (see
:mod:`eqco_jax.core.evaluate.features`), whoever built them.
"""
