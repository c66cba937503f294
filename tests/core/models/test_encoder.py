"""eqco_jax.core.models.encoder: backbone + head, train and inference modes,
bfloat16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqco_jax.core import models


KEY = jax.random.key(0)


def _tiny_encoder(head="mlp_bn", dtype=jnp.float32, **kwargs):
  return models.create_encoder("resnet10", head, width=8, small_image_stem=True,
                               head_hidden_dim=16, head_out_dim=8, dtype=dtype,
                               **kwargs)


@pytest.fixture(scope="module")
def tiny():
  """A tiny float32 SiMo encoder, its variables and a batch."""
  encoder = _tiny_encoder()
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
  variables = encoder.init(KEY, x, train=False)
  return encoder, variables, x


def test_encoder_outputs_and_train_mode(tiny):
  encoder, variables, x = tiny
  out, state = encoder.apply(variables, x, train=True,
                             mutable=["batch_stats"])
  assert out["features"].shape == (8, 64)
  assert out["embedding"].shape == (8, 8)
  assert out["features"].dtype == out["embedding"].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                             rtol=1e-5)
  assert set(variables["params"]) == {"backbone", "head"}
  # Train mode moves the running statistics of backbone and head.
  for part in ("backbone", "head"):
    before = jax.tree.leaves(variables["batch_stats"][part])
    after = jax.tree.leaves(state["batch_stats"][part])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_eval_mode_keeps_batch_stats(tiny):
  encoder, variables, x = tiny
  out, state = encoder.apply(variables, x, train=False,
                             mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"],
               variables["batch_stats"])
  # Eval output uses running stats (init: mean 0, var 1), not batch stats.
  out_train = encoder.apply(variables, x, train=True,
                            mutable=["batch_stats"])[0]
  assert not np.allclose(out["features"], out_train["features"], atol=1e-3)


def test_mocov2_encoder(tiny):
  _, simo_variables, x = tiny
  encoder = _tiny_encoder("mlp")
  variables = encoder.init(KEY, x, train=False)
  assert "head" not in variables["batch_stats"]
  # Same backbone variables as the SiMo encoder: only the head differs.
  assert (jax.tree.structure(variables["params"]["backbone"]) ==
          jax.tree.structure(simo_variables["params"]["backbone"]))
  out, _ = encoder.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out["embedding"].shape == (8, 8)
  np.testing.assert_allclose(jnp.linalg.norm(out["embedding"], axis=-1), 1.0,
                             rtol=1e-5)


def test_bfloat16_compute(tiny):
  encoder, variables, x = tiny
  bf16 = _tiny_encoder(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(bf16.init(KEY, x, train=False)))
  out, state = bf16.apply(variables, x, train=True, mutable=["batch_stats"])
  ref = encoder.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  assert out["features"].dtype == out["embedding"].dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state))
  np.testing.assert_allclose(out["features"], ref["features"], rtol=0.05,
                             atol=0.05)
  assert not np.array_equal(out["features"], ref["features"])  # Really bf16.
  np.testing.assert_allclose(out["embedding"], ref["embedding"], atol=0.05)
