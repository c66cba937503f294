"""Backbones from other frameworks' files (``config.init_from``).

A ResNet ``.safetensors`` or ``.pth`` as torchvision, timm, MoCo v1/v2/v3,
solo-learn, mmselfsup or VISSL write it (its keys found by
:func:`layout.backbone_state`; heads, momentum encoders and
queues ignored), on a local disk, on object storage (``gs://``, through
:mod:`storage`) or at an ``http(s)://`` URL (downloaded once into
:func:`storage.download_cache`), is checked against the config's ResNet and
becomes its backbone: both the online and the momentum backbone of a
pretraining run, or the frozen backbone of a linear evaluation. The running
variances are taken as they are, so the backbone in inference mode computes
what the PyTorch model computes in ``eval()`` mode.
"""

from __future__ import annotations

import http.client
import io
import urllib.error
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from eqco_jax.core import models
from eqco_jax.core import sharding
from eqco_jax.core.errors import UserError, one_line
from eqco_jax.core.training.train_state import TrainState
from eqco_jax.core.types import PyTree
from eqco_jax.program.files import storage
from eqco_jax.program.torchvision import layout

# How long a server may stay silent before a download is given up.
DOWNLOAD_TIMEOUT_SECS = 30.0
WHAT = "a ResNet .pth or .safetensors"


def _reason(error: BaseException) -> str:
  """The first line of what went wrong, for a one-sentence message."""
  if isinstance(error, urllib.error.HTTPError):
    return f"HTTP {error.code} {error.reason}"
  if isinstance(error, urllib.error.URLError):
    error = error.reason if isinstance(error.reason, BaseException) else error
  return one_line(error)


def local_file(location: str, cache: epath.Path | None = None) -> epath.Path:
  """The file ``config.init_from`` names: a local path or ``gs://`` URL as
  it is, an ``http(s)://`` URL as its copy in ``cache`` (default
  :func:`storage.download_cache`), downloaded on first use.

  Raises:
    UserError: the download fails (offline, unknown host, HTTP error, no
      answer within DOWNLOAD_TIMEOUT_SECS), or the file does not exist.
  """
  if storage.is_web_url(location):
    try:
      return storage.cached_download(location, DOWNLOAD_TIMEOUT_SECS, cache)
    except (OSError, http.client.HTTPException) as error:
      raise UserError(
          f"cannot download config.init_from={location} ({_reason(error)}); "
          "check the URL and this machine's network, or download the file "
          "by hand and give its local path.") from None
  try:
    source = storage.path(location) if location else None
    found = source is not None and source.is_file()
  except Exception as error:  # any backend's failure, in one sentence
    raise _inaccessible("reach", location, error) from None
  if not found:
    raise UserError(f"config.init_from={location!r} is not a file; give the "
                    f"path, gs:// or https:// URL of {WHAT}.")
  return source


def _inaccessible(verb: str, location: str, error: BaseException
                  ) -> UserError:
  """One sentence: ``location`` cannot be ``verb``-ed (reach, read)."""
  return UserError(
      f"cannot {verb} config.init_from={location} ({_reason(error)}); check "
      "the path, and for gs:// this machine's credentials and network.")


def _numpy_tree(obj: Any, torch: Any) -> Any:
  """Nested dicts of tensors as nested dicts (str keys) of numpy arrays;
  None for anything else (numbers, strings, optimizer lists)."""
  if isinstance(obj, torch.Tensor):
    tensor = obj.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # which numpy cannot hold
      tensor = tensor.float()
    return tensor.numpy()
  if not isinstance(obj, dict):
    return None
  tree = {str(k): _numpy_tree(v, torch) for k, v in obj.items()}
  return {k: v for k, v in tree.items() if v is not None}


def _read_bytes(source: epath.Path, location: str) -> bytes:
  try:
    return source.read_bytes()
  except Exception as error:  # any backend's failure, in one sentence
    raise _inaccessible("read", location, error) from None


def _unreadable(source: epath.Path, location: str, how: str,
                reason: str, what_to_do: str) -> UserError:
  """One sentence: the file cannot be read ``how``, and what to do."""
  copy = (f" (or delete its copy {source} to download it again)"
          if storage.is_web_url(location) else "")
  return UserError(f"cannot read config.init_from={location} {how} "
                   f"({reason}); {what_to_do}{copy}.")


def _torch_reason(error: BaseException) -> str:
  """torch.load's reason in a few words, without its advice (which is to
  load the file unsafely)."""
  text = str(error)
  detail = text.partition("WeightsUnpickler error:")[2] or text
  line = next((l.strip() for l in detail.splitlines() if l.strip()), "")
  return f"{type(error).__name__}: {line.split('. ')[0].rstrip('.')}"


def _read_pth(source: epath.Path, location: str) -> dict[str, Any]:
  """The tensors of a ``.pth`` as (nested dicts of) numpy arrays."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"reading {location} needs PyTorch (pip install torch); "
                    "or convert it to .safetensors first.") from None
  data = _read_bytes(source, location)
  try:
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  except Exception as error:  # a damaged file, or objects beside tensors
    raise _unreadable(
        source, location, "with torch.load(weights_only=True)",
        _torch_reason(error), "save the state_dict alone (torch.save("
        "checkpoint['state_dict'], ...)), or check the file") from None
  if not isinstance(obj, dict):
    raise UserError(f"{location} holds a {type(obj).__name__}, not a "
                    "state_dict; save model.state_dict() instead of the model.")
  return _numpy_tree(obj, torch)


def _read_safetensors(source: epath.Path, location: str
                      ) -> dict[str, np.ndarray]:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  data = _read_bytes(source, location)
  try:
    return safetensors_numpy.load(data)
  except Exception as error:  # a damaged or truncated file
    raise _unreadable(source, location, "as safetensors", _reason(error),
                      "check the file") from None


def read_backbone_state(path: str, cache: epath.Path | None = None
                        ) -> layout.StateDict:
  """The torchvision backbone keys of the file ``path`` (local, ``gs://``
  or ``http(s)://``; ``cache``: see :func:`local_file`)."""
  source = local_file(path, cache)
  if source.name.endswith(".safetensors"):
    checkpoint = _read_safetensors(source, path)
  else:
    checkpoint = _read_pth(source, path)
  return layout.backbone_state(checkpoint)


def file_architecture(path: str) -> dict[str, Any]:
  """``{'model', 'width', 'small_image_stem'}`` of the file's ResNet."""
  return layout.architecture(read_backbone_state(path))


def load_backbone(path: str, expected: PyTree, model: str) -> PyTree:
  """Backbone variables (numpy, float32) from ``path``, checked against the
  ``expected`` variables' names and shapes (arrays or ShapeDtypeStructs)."""
  state = read_backbone_state(path)
  layout.check_matches(
      state, layout.torchvision_shapes(expected),
      f"config.init_from={path}", model)
  return layout.from_torchvision(state)


def backbone_shapes(backbone: models.ResNet, image_size: int) -> PyTree:
  """``backbone``'s variables at ``image_size`` as ShapeDtypeStructs
  (nothing run)."""
  return jax.eval_shape(
      lambda x: backbone.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def _placed_like(template: PyTree, values: PyTree) -> PyTree:
  """``values`` (host arrays) with ``template``'s dtypes and shardings."""
  return sharding.place(
      jax.tree.map(lambda t, v: np.asarray(v, t.dtype), template, values),
      jax.tree.map(lambda t: t.sharding, template))


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
  online, momentum = _placed_like(online, values), _placed_like(momentum,
                                                                values)
  return state.replace(
      params={**state.params, "backbone": online["params"]},
      batch_stats={**state.batch_stats, "backbone": online["batch_stats"]},
      momentum_params={**state.momentum_params,
                       "backbone": momentum["params"]},
      momentum_batch_stats={**state.momentum_batch_stats,
                            "backbone": momentum["batch_stats"]})
