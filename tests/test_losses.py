"""eqco_jax.losses, the public path of the loss: it hands on the core's own
functions."""

from eqco_jax import losses
from eqco_jax.core import losses as core_losses


def test_the_public_loss_is_the_cores():
  assert losses.__all__ and all(
      getattr(losses, name) is getattr(core_losses, name)
      for name in losses.__all__)
