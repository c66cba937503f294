"""The EqCo / InfoNCE losses for your own JAX code (public path of
:mod:`eqco_jax.core.losses`): pure ``jax.numpy``, jittable, usable inside
``shard_map``/``pmap`` with ``axis_name``."""

from eqco_jax.core.losses import candidate_accuracies
from eqco_jax.core.losses import eqco_from_logits
from eqco_jax.core.losses import eqco_infonce
from eqco_jax.core.losses import in_batch_eqco
from eqco_jax.core.losses import in_batch_logits
from eqco_jax.core.losses import infonce_logits
from eqco_jax.core.losses import l2_normalize
from eqco_jax.core.losses import negative_logit_shift
from eqco_jax.core.losses import positive_rank_accuracy

__all__ = [
    "candidate_accuracies", "eqco_from_logits", "eqco_infonce",
    "in_batch_eqco", "in_batch_logits", "infonce_logits", "l2_normalize",
    "negative_logit_shift", "positive_rank_accuracy",
]
