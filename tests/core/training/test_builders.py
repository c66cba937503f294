"""eqco_jax.core.training.builders: a run's parts, each read from its config once."""

import jax
import jax.numpy as jnp
import pytest

from helpers import build_pretraining, default_config, load_config
from helpers import tiny_config
from eqco_jax.core import sharding
from eqco_jax.core.methods import MoCoV2, SiMo
from eqco_jax.core.training import builders


def test_the_method_takes_the_loss_and_its_own_fields_from_the_config():
  simo = builders.method_of(default_config(
      temperature=0.5, num_negatives=16, symmetric=True))
  assert simo == SiMo(temperature=0.5, alpha=65536.0, num_negatives=16,
                      symmetric=True)
  moco = builders.method_of(default_config(
      method="mocov2", eqco=False, queue_size=1024, shuffle_bn=False))
  assert moco == MoCoV2(temperature=0.2, alpha=None, queue_size=1024,
                        num_negatives=None, shuffle_bn=False)


@pytest.mark.parametrize("fields, steps_per_epoch, derived", [
    (dict(num_train_steps=7, num_epochs=200), 5004, (7, 10, -1)),
    (dict(num_train_steps=-1, num_epochs=200), 5004, (200 * 5004, 10, -1)),
    # The large-batch recipe's 10 warm-up epochs, at 4096 and at 8192:
    # 10 epochs at any batch.
    (dict(warmup_epochs=10.0), 1281167 // 4096, (200 * 312, 3120, -1)),
    (dict(warmup_epochs=10.0), 1281167 // 8192, (200 * 156, 1560, -1)),
    (dict(eval_every_epochs=5.0, eval_every_steps=7), 97, (19400, 10, 485)),
    (dict(eval_every_steps=7), 97, (19400, 10, 7)),
])
def test_values_in_epochs_become_steps_of_the_data(fields, steps_per_epoch,
                                                  derived):
  lengths = builders.derived(default_config(**fields), steps_per_epoch)
  assert (lengths.total_steps, lengths.warmup_steps,
          lengths.eval_every_steps) == derived


def test_pretraining_parts_follow_the_config():
  config = tiny_config("simo", base_learning_rate=0.4, batch_size=16,
                       warmup_steps=2, dtype="bfloat16", optimizer="lars")
  run = build_pretraining(config, total_steps=10)
  assert run.total_steps == 10 and run.method == builders.method_of(config)
  # Linear warm-up to lr x batch / 256, then cosine to zero.
  assert float(run.schedule(2)) == pytest.approx(0.4 * 16 / 256)
  assert float(run.schedule(10)) == pytest.approx(0.0)
  assert run.encoder.backbone.dtype == jnp.bfloat16
  assert run.encoder.head.batch_norm  # config.head "mlp_bn"
  lars_state = jax.tree.structure(run.tx.init({"kernel": jnp.ones(2)}))
  sgd = build_pretraining(tiny_config("simo"), total_steps=10)
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
  run = build_pretraining(config, total_steps=1)
  encoder, backbone = run.encoder, run.backbone
  assert builders.backbone_of(config) == backbone
  assert (encoder.backbone.bn_group_size, encoder.backbone.remat) == (4, True)
  assert (backbone.bn_group_size, backbone.remat) == (None, False)
  assert (backbone.stage_sizes, backbone.width, backbone.small_image_stem) == (
      encoder.backbone.stage_sizes, 4, True)


def test_alpha_and_k_as_the_loss_sees_them():
  moco = load_config("mocov2.py", "imagenet_r50")
  assert builders.loss_alpha(moco) is None  # plain InfoNCE
  k16 = load_config("mocov2.py", "imagenet_r50_k16")
  assert (builders.negatives_per_query(k16), builders.loss_alpha(k16)) == (
      16, 65536.0)
  assert builders.negatives_per_query(moco) == 65536  # the whole queue
  # The official SiMo code's released run (68.04): alpha = K = 256, that is
  # plain InfoNCE over the 255 in-batch negatives.
  official = load_config("simo.py", "imagenet_r50_official")
  assert builders.loss_alpha(official) is None
  assert builders.negatives_per_query(official) == 255
