"""eqco_jax.models, the public path of the models: the core's own."""

from eqco_jax import models
from eqco_jax.core import models as core_models


def test_the_public_models_are_the_cores():
  assert set(models.__all__) == set(core_models.__all__)
  assert all(getattr(models, name) is getattr(core_models, name)
             for name in models.__all__)
