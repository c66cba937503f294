"""eqco_jax.core.methods.base: every registered method answers the whole
``Method`` protocol, with its arguments."""

import inspect

import pytest

from eqco_jax.core.methods import METHODS, Method

DECISIONS = ("init_queue", "key_embeddings", "loss", "update_queue")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_makes_the_protocols_decisions(name):
  method = METHODS[name]
  for decision in DECISIONS:
    wanted = inspect.signature(getattr(Method, decision)).parameters
    got = inspect.signature(getattr(method, decision)).parameters
    assert list(got) == list(wanted), (name, decision)
  assert "symmetric" in {f for f in method.__dataclass_fields__}
