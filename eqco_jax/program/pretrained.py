"""Backbones from torchvision files (``config.init_from``).

A torchvision ResNet ``.safetensors`` or ``.pth`` (a plain state_dict, or a
checkpoint holding one under ``state_dict`` or ``model``; ``module.`` and
``encoder_q.`` prefixes stripped, ``fc``, heads and key encoders ignored) is
checked against the config's ResNet and becomes its backbone: both the
online and the momentum backbone of a pretraining run, or the frozen
backbone of a linear evaluation. The running variances are taken as they
are, so the backbone in inference mode computes what the PyTorch model
computes in ``eval()`` mode.
"""

from __future__ import annotations

import io
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eqco_jax.core import builders
from eqco_jax.core.errors import UserError
from eqco_jax.core.models import torchvision_layout
from eqco_jax.core.train_state import TrainState
from eqco_jax.program import storage

PyTree = Any
CONTAINER_KEYS = ("state_dict", "model")  # where checkpoints keep the weights


def _read_pth(path: str) -> dict[str, Any]:
  """The tensors of a ``.pth`` as numpy arrays (needs PyTorch)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"reading {path} needs PyTorch (pip install torch); or "
                    "convert it to .safetensors first.") from None
  obj = torch.load(io.BytesIO(storage.path(path).read_bytes()),
                   map_location="cpu", weights_only=True)
  for key in CONTAINER_KEYS:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise UserError(f"{path} holds a {type(obj).__name__}, not a state_dict; "
                    "save model.state_dict() instead of the model.")
  return {k: v.detach().cpu().numpy() for k, v in obj.items()
          if isinstance(v, torch.Tensor)}


def read_backbone_state(path: str) -> torchvision_layout.StateDict:
  """The torchvision backbone keys of the file at ``path``."""
  if not path or not storage.path(path).is_file():
    raise UserError(f"config.init_from={path!r} is not a file; give a "
                    "torchvision ResNet .pth or .safetensors.")
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    checkpoint = safetensors_numpy.load(storage.path(path).read_bytes())
  else:
    checkpoint = _read_pth(path)
  return torchvision_layout.backbone_state(checkpoint)


def file_architecture(path: str) -> dict[str, Any]:
  """``{'model', 'width', 'small_image_stem'}`` of the file's ResNet."""
  return torchvision_layout.architecture(read_backbone_state(path))


def load_backbone(path: str, expected: PyTree, model: str) -> PyTree:
  """Backbone variables (numpy, float32) from ``path``, checked against the
  ``expected`` variables' names and shapes (arrays or ShapeDtypeStructs)."""
  state = read_backbone_state(path)
  torchvision_layout.check_matches(
      state, torchvision_layout.torchvision_shapes(expected),
      f"config.init_from={path}", model)
  return torchvision_layout.from_torchvision(state)


def backbone_shapes(config: ml_collections.ConfigDict) -> PyTree:
  """The config's backbone variables as ShapeDtypeStructs (nothing run)."""
  backbone = builders.backbone_of(config)
  size = config.image_size
  return jax.eval_shape(
      lambda x: backbone.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def placed_like(template: PyTree, values: PyTree) -> PyTree:
  """``values`` (host arrays) as global arrays with ``template``'s shardings
  and dtypes; works for replicated arrays in multi-process runs."""

  def place(t: jax.Array, v: np.ndarray) -> jax.Array:
    v = np.asarray(v, t.dtype)
    return jax.make_array_from_callback(t.shape, t.sharding, lambda i: v[i])

  return jax.tree.map(place, template, values)


def initialise_backbone(state: TrainState, config: ml_collections.ConfigDict
                        ) -> TrainState:
  """``state`` with the online and momentum backbones (params and BN
  statistics) from ``config.init_from``; ``state`` itself when it is ''."""
  path = config.get("init_from")
  if not path:
    return state
  online = {"params": state.params["backbone"],
            "batch_stats": state.batch_stats["backbone"]}
  momentum = {"params": state.momentum_params["backbone"],
              "batch_stats": state.momentum_batch_stats["backbone"]}
  values = load_backbone(path, online, config.model)
  # Separate buffers for the two encoders: the step donates the state.
  online, momentum = placed_like(online, values), placed_like(momentum, values)
  return state.replace(
      params={**state.params, "backbone": online["params"]},
      batch_stats={**state.batch_stats, "backbone": online["batch_stats"]},
      momentum_params={**state.momentum_params,
                       "backbone": momentum["params"]},
      momentum_batch_stats={**state.momentum_batch_stats,
                            "backbone": momentum["batch_stats"]})
