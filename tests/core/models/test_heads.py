"""eqco_jax.core.models.heads: the projection heads, by config name, and the
linear classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqco_jax.core import models


KEY = jax.random.key(0)


def test_heads():
  x = jax.random.normal(KEY, (6, 32))
  simo = models.create_head("mlp_bn", hidden_dim=16, out_dim=8)
  moco = models.create_head("mlp", hidden_dim=16, out_dim=8)
  simo_vars = simo.init(KEY, x, train=True)
  moco_vars = moco.init(KEY, x, train=True)
  assert simo.apply(simo_vars, x, train=False).shape == (6, 8)
  assert moco.apply(moco_vars, x, train=False).shape == (6, 8)

  sp = simo_vars["params"]
  assert set(sp) == {"fc1", "bn1", "fc2", "bn2"}
  assert set(sp["fc1"]) == {"kernel"} and set(sp["fc2"]) == {"kernel"}
  assert sp["fc1"]["kernel"].shape == (32, 16)
  assert set(simo_vars["batch_stats"]) == {"bn1", "bn2"}
  mp = moco_vars["params"]
  assert set(mp) == {"fc1", "fc2"}
  assert set(mp["fc1"]) == {"kernel", "bias"}
  assert mp["fc2"]["bias"].shape == (8,)
  assert "batch_stats" not in moco_vars

  # Output is not L2-normalised by the head.
  y = moco.apply(moco_vars, 10.0 * x, train=False)
  assert not np.allclose(jnp.linalg.norm(y, axis=-1), 1.0, atol=1e-2)

  classifier = models.LinearClassifier(num_classes=10)
  p = classifier.init(KEY, jnp.ones((2, 512)))["params"]["fc"]
  np.testing.assert_array_equal(p["bias"], 0.0)
  assert abs(float(p["kernel"].std()) - 0.01) < 1e-3


def test_create_rejects_unknown_names():
  with pytest.raises(ValueError, match="resnet51.*resnet50"):
    models.create_backbone("resnet51")
  with pytest.raises(ValueError, match="byol.*mlp_bn"):
    models.create_encoder("resnet18", "byol")
  assert tuple(models.LAYOUTS) == ("resnet10", "resnet18", "resnet34",
                                   "resnet50", "resnet101")
  assert tuple(models.HEADS) == ("mlp_bn", "mlp")
