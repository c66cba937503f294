"""eqco_jax.core.builders: a run's parts, each read from its config once."""

import jax
import jax.numpy as jnp
import pytest

from helpers import default_config, tiny_config
from eqco_jax.core import builders
from eqco_jax.core import sharding
from eqco_jax.core.methods import MoCoV2, SiMo


def test_the_method_takes_the_loss_and_its_own_fields_from_the_config():
  simo = builders.method_of(default_config(
      temperature=0.5, num_negatives=16, symmetric=True))
  assert simo == SiMo(temperature=0.5, alpha=65536.0, num_negatives=16,
                      symmetric=True)
  moco = builders.method_of(default_config(
      method="mocov2", eqco=False, queue_size=1024, shuffle_bn=False))
  assert moco == MoCoV2(temperature=0.2, alpha=None, queue_size=1024,
                        num_negatives=None, shuffle_bn=False)


@pytest.mark.parametrize("fields, steps_per_epoch, total", [
    (dict(num_train_steps=7, num_epochs=200), 5004, 7),
    (dict(num_train_steps=-1, num_epochs=200), 5004, 200 * 5004),
])
def test_total_steps(fields, steps_per_epoch, total):
  assert builders.total_train_steps(default_config(**fields),
                                    steps_per_epoch) == total


def test_pretraining_parts_follow_the_config():
  config = tiny_config("simo", base_learning_rate=0.4, batch_size=16,
                       warmup_steps=2, dtype="bfloat16", optimizer="lars")
  run = builders.build_pretraining(config, total_steps=10)
  assert run.total_steps == 10 and run.method == builders.method_of(config)
  # Linear warm-up to lr x batch / 256, then cosine to zero.
  assert float(run.schedule(2)) == pytest.approx(0.4 * 16 / 256)
  assert float(run.schedule(10)) == pytest.approx(0.0)
  assert run.encoder.backbone.dtype == jnp.bfloat16
  assert run.encoder.head.batch_norm  # config.head "mlp_bn"
  lars_state = jax.tree.structure(run.tx.init({"kernel": jnp.ones(2)}))
  sgd = builders.build_pretraining(tiny_config("simo"), total_steps=10)
  assert lars_state != jax.tree.structure(
      sgd.tx.init({"kernel": jnp.ones(2)}))
  mesh = sharding.make_mesh()
  state = run.initial_state(mesh)
  assert state.params["backbone"]["conv1"]["kernel"].dtype == jnp.float32
  assert state.params["backbone"]["conv1"]["kernel"].sharding == (
      sharding.replicated(mesh))
  assert state.queue is None and int(state.step) == 0


def test_the_feature_backbone_is_the_encoders_without_groups_or_remat():
  config = tiny_config("mocov2", remat=True)  # BN groups of 4
  encoder = builders.build_pretraining(config, total_steps=1).encoder
  backbone = builders.backbone_of(config)
  assert (encoder.backbone.bn_group_size, encoder.backbone.remat) == (4, True)
  assert (backbone.bn_group_size, backbone.remat) == (None, False)
  assert (backbone.stage_sizes, backbone.width, backbone.small_image_stem) == (
      encoder.backbone.stage_sizes, 4, True)
