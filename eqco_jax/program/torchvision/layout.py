"""ResNet backbone variables <-> torchvision ``state_dict`` arrays, the
detectron2 names of the same arrays, and the torchvision keys found in the
checkpoints other projects write (:func:`backbone_state`: a table of
containers and prefixes).

Pure numpy on nested dicts, so that the program layer can write and read
safetensors, ``.pth`` and detectron2 pickles without this module knowing
any of those formats.

The backbone's variables (``{'params': ..., 'batch_stats': ...}`` of
:class:`eqco_jax.models.ResNet`) map one to one onto
``torchvision.models.resnet{18,34,50,101}().state_dict()`` without ``fc.*``:

- ``conv1``, ``bn1``, ``layer{i}_{j}/conv{k}``, ``layer{i}_{j}/bn{k}`` ->
  ``conv1``, ``bn1``, ``layer{i}.{j}.conv{k}``, ``layer{i}.{j}.bn{k}``;
  ``downsample_conv`` / ``downsample_bn`` -> ``downsample.0`` /
  ``downsample.1``.
- conv ``kernel [kh, kw, in, out]`` -> ``weight [out, in, kh, kw]``; BN
  ``scale``, ``bias``, ``mean``, ``var`` -> ``weight``, ``bias``,
  ``running_mean``, ``running_var``, plus an int64 ``num_batches_tracked``.

ResNet-10 (one block per stage) has the same names; torchvision builds it as
``ResNet(BasicBlock, [1, 1, 1, 1])``. The small-image stem keeps the names
with a ``conv1.weight`` of ``[width, 3, 3, 3]`` (3x3, stride 1, padding 1,
and no max-pool in the network that loads it).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from eqco_jax.core.errors import UserError
from eqco_jax.core.models.resnet import LAYOUTS
from eqco_jax.core.types import PyTree

StateDict = dict[str, np.ndarray]

# torchvision key prefixes of the backbone (everything but ``fc.``).
BACKBONE_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.",
                     "layer4.")
# Where a file keeps its state dict: dict keys from the file's top, tried in
# this order (a plain state_dict; Lightning, MoCo, mmselfsup, timm; the
# torchvision reference scripts; a VISSL checkpoint's trunk).
CONTAINERS = ((), ("state_dict",), ("model",),
              ("classy_state_dict", "base_model", "model", "trunk"))
# The prefix each project writes in front of torchvision's backbone keys,
# and who writes it ('': a generic wrapper). Anything else in the file is
# skipped: ``fc.``, and (in the comments) what the projects keep beside the
# backbone.
PREFIXES = (
    ("", "torchvision, timm"),  # timm's ResNet has torchvision's keys (fc.)
    ("module.", "torchvision, timm"),  # under DataParallel
    ("module.encoder_q.", "MoCo v1/v2"),  # (module.encoder_k., module.queue)
    ("encoder_q.", "MoCo v1/v2"),  # without DataParallel, as SiMo's
    ("module.base_encoder.", "MoCo v3"),
    # (module.momentum_encoder., module.predictor.)
    ("base_encoder.", "MoCo v3"),
    ("backbone.", "solo-learn, mmselfsup"),
    # solo-learn and Lightning (momentum_backbone., projector.,
    # classifier.); mmselfsup (neck., head., the momentum copy target_net.,
    # encoder_k. or momentum_encoder.)
    ("_feature_blocks.", "VISSL"),  # classy_state_dict's trunk (heads)
    ("trunk._feature_blocks.", "VISSL"),  # flat files (heads.)
    ("encoder.", ""),
    ("model.", ""),
)

_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_MODULE_NAMES = {"downsample_conv": "downsample.0",
                 "downsample_bn": "downsample.1"}


def torch_module_name(path: tuple[str, ...]) -> str:
  """``('layer2_0', 'downsample_bn')`` -> ``'layer2.0.downsample.1'``."""
  parts = []
  for name in path:
    block = re.fullmatch(r"layer(\d+)_(\d+)", name)
    if block:
      parts.append(f"layer{block[1]}.{block[2]}")
    else:
      parts.append(_MODULE_NAMES.get(name, name))
  return ".".join(parts)


def _is_batch_norm(module: str) -> bool:
  return module.rsplit(".", 1)[-1].startswith("bn") or module.endswith(
      "downsample.1")


_BLOCK_ORDER = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample.0",
                "downsample.1")


def _torchvision_order(module: str) -> tuple[int, ...]:
  """Sort key putting modules in the order of torchvision's state_dict."""
  block = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", module)
  if block is None:  # the stem: conv1, then bn1
    return (0, 0, int(module != "conv1"))
  return (int(block[1]), int(block[2]), _BLOCK_ORDER.index(block[3]))


_ARRAY_ORDER = ("weight", "bias", "running_mean", "running_var",
                "num_batches_tracked")


def _key_order(key: str) -> tuple[tuple[int, ...], int]:
  """Sort key putting torchvision keys in the order of its state_dict."""
  module, name = key.rsplit(".", 1)
  return _torchvision_order(module), _ARRAY_ORDER.index(name)


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  """``(path, leaf)`` of a nested dict, in insertion order."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torchvision_shapes(variables: PyTree) -> dict[str, tuple[int, ...]]:
  """torchvision key -> shape of the backbone ``variables`` (arrays or
  ``jax.ShapeDtypeStruct``s), ``num_batches_tracked`` included, in the
  order of torchvision's state_dict."""
  shapes = {}
  for path, leaf in _leaves(variables["params"]):
    module, name = torch_module_name(path[:-1]), path[-1]
    if name == "kernel":
      kh, kw, cin, cout = leaf.shape
      shapes[f"{module}.weight"] = (cout, cin, kh, kw)
    else:
      shapes[f"{module}.{_BN_PARAMS[name]}"] = tuple(leaf.shape)
  for path, leaf in _leaves(variables["batch_stats"]):
    module, name = torch_module_name(path[:-1]), path[-1]
    shapes[f"{module}.{_BN_STATS[name]}"] = tuple(leaf.shape)
    shapes[f"{module}.num_batches_tracked"] = ()
  return dict(sorted(shapes.items(), key=lambda item: _key_order(item[0])))


def to_torchvision(variables: PyTree, *, num_batches_tracked: int = 0,
                   variance_counts: Mapping[str, int] | None = None
                   ) -> StateDict:
  """The torchvision ``state_dict`` (less ``fc``) of backbone ``variables``.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a ResNet backbone.
    num_batches_tracked: the value of every BN's ``num_batches_tracked``.
    variance_counts: torchvision BN module name (``'layer1.0.bn1'``) -> the
      number n of values per channel each batch statistic was taken over
      (examples per BN group x H x W). Flax keeps the biased variance and
      PyTorch the unbiased one, so ``running_var`` is multiplied by
      ``n / (n - 1)``. None: the variances are written as they are (e.g.
      statistics that came from PyTorch).

  Returns:
    key -> float32 array in PyTorch's layout (int64 ``num_batches_tracked``),
    keys in the order of ``torchvision.models.resnet*().state_dict()``.
  """
  params = {torch_module_name(p[:-1]) + "/" + p[-1]: np.asarray(v)
            for p, v in _leaves(variables["params"])}
  stats = {torch_module_name(p[:-1]) + "/" + p[-1]: np.asarray(v)
           for p, v in _leaves(variables["batch_stats"])}
  modules = sorted(dict.fromkeys(k.split("/")[0] for k in params),
                   key=_torchvision_order)
  state = {}
  for module in modules:
    if not _is_batch_norm(module):
      kernel = params[f"{module}/kernel"]
      state[f"{module}.weight"] = np.ascontiguousarray(
          kernel.transpose(3, 2, 0, 1), np.float32)
      continue
    state[f"{module}.weight"] = params[f"{module}/scale"].astype(np.float32)
    state[f"{module}.bias"] = params[f"{module}/bias"].astype(np.float32)
    var = stats[f"{module}/var"].astype(np.float64)
    if variance_counts is not None:
      n = variance_counts[module]
      var = var * (n / (n - 1)) if n > 1 else var
    state[f"{module}.running_mean"] = stats[f"{module}/mean"].astype(
        np.float32)
    state[f"{module}.running_var"] = var.astype(np.float32)
    state[f"{module}.num_batches_tracked"] = np.asarray(num_batches_tracked,
                                                        np.int64)
  return state


def _flax_path(key: str) -> tuple[str, tuple[str, ...], str]:
  """torchvision key -> (collection, flax path, 'kernel' | 'vector')."""
  module, name = key.rsplit(".", 1)
  parts = module.split(".")
  path = []
  while parts:
    if re.fullmatch(r"layer\d+", parts[0]) and len(parts) > 1:
      path.append(f"{parts[0]}_{parts[1]}")
      parts = parts[2:]
    elif parts[:2] == ["downsample", "0"]:
      path.append("downsample_conv")
      parts = parts[2:]
    elif parts[:2] == ["downsample", "1"]:
      path.append("downsample_bn")
      parts = parts[2:]
    else:
      path.append(parts.pop(0))
  if not _is_batch_norm(module):
    return "params", tuple(path) + ("kernel",), "kernel"
  collection, leaf = {
      "weight": ("params", "scale"), "bias": ("params", "bias"),
      "running_mean": ("batch_stats", "mean"),
      "running_var": ("batch_stats", "var")}[name]
  return collection, tuple(path) + (leaf,), "vector"


def from_torchvision(state: Mapping[str, np.ndarray]) -> PyTree:
  """Backbone variables ``{'params', 'batch_stats'}`` of a torchvision
  backbone state (:func:`backbone_state`), float32.

  The running variances are taken as they are, so the backbone in inference
  mode computes what the PyTorch model computes in ``eval()`` mode.
  ``num_batches_tracked`` is dropped (flax keeps no counter).
  """
  variables = {"params": {}, "batch_stats": {}}
  for key, value in state.items():
    if key.endswith(".num_batches_tracked"):
      continue
    collection, path, kind = _flax_path(key)
    value = np.asarray(value, np.float32)
    if kind == "kernel":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    _set(variables[collection], path, value)
  return variables


def _is_backbone_key(key: str) -> bool:
  return key.startswith(BACKBONE_PREFIXES)


def _container(checkpoint: Mapping[str, Any], keys: tuple[str, ...]
               ) -> Mapping[str, Any] | None:
  """``checkpoint[keys[0]][keys[1]]...`` if that is a dict, else None."""
  for key in keys:
    if not isinstance(checkpoint, Mapping):
      return None
    checkpoint = checkpoint.get(key)
  return checkpoint if isinstance(checkpoint, Mapping) else None


def _under(tree: Mapping[str, Any], prefix: str) -> StateDict:
  """The backbone keys of ``tree`` written behind ``prefix``, stripped."""
  return {key[len(prefix):]: np.asarray(value) for key, value in tree.items()
          if isinstance(key, str) and key.startswith(prefix)
          and _is_backbone_key(key[len(prefix):])
          and not isinstance(value, Mapping)}


def understood_layouts() -> str:
  """The projects whose files :func:`backbone_state` reads, in words."""
  return ", ".join(dict.fromkeys(name for _, name in PREFIXES if name))


def backbone_state(checkpoint: Mapping[str, Any]) -> StateDict:
  """The torchvision backbone keys of a checkpoint, however its project
  wrote them.

  Args:
    checkpoint: a state dict, or nested dicts holding one at one of
      CONTAINERS (values: arrays; anything else is skipped).

  Returns:
    torchvision key -> array, for the first container that holds backbone
    keys behind one of PREFIXES (the prefix stripped); ``fc.*``, heads,
    momentum encoders, queues and counters left out.

  Raises:
    UserError: no container holds backbone keys, or one holds them behind
      two prefixes (two encoders).
  """
  for keys in CONTAINERS:
    tree = _container(checkpoint, keys)
    if tree is None:
      continue
    found = {prefix: state for prefix, _ in PREFIXES
             if (state := _under(tree, prefix))}
    if len(found) > 1:
      first, second = list(found)[:2]
      raise UserError(
          f"the checkpoint holds two ResNets, under {first or 'no prefix'!r} "
          f"and {second!r}; keep one encoder's weights in the file.")
    if found:
      return next(iter(found.values()))
  sample = ", ".join("/".join(map(str, path))
                     for path, _ in itertools.islice(_leaves(checkpoint), 3))
  raise UserError(
      "the checkpoint holds no ResNet keys in a layout eqco-jax reads (its "
      f"first keys are {sample or 'none'}); give a ResNet's torchvision "
      f"state_dict, or a checkpoint as {understood_layouts()} write it.")


def architecture(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """``{'model', 'width', 'small_image_stem'}`` of a torchvision backbone
  state (:func:`backbone_state`); UserError when it is none of MODELS."""
  if "conv1.weight" not in state:
    raise UserError("the checkpoint has no conv1.weight; give the state_dict "
                    "of a torchvision ResNet.")
  conv1 = state["conv1.weight"]
  blocks = tuple(
      len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
      for i in (1, 2, 3, 4))
  bottleneck = "layer1.0.conv3.weight" in state
  for model, (stage_sizes, block_cls) in LAYOUTS.items():
    if (tuple(stage_sizes) == blocks
        and (block_cls.expansion == 4) == bottleneck):
      return {"model": model, "width": int(conv1.shape[0]),
              "small_image_stem": conv1.shape[-1] == 3}
  kind = "bottleneck" if bottleneck else "basic"
  raise UserError(
      f"the checkpoint's ResNet has {blocks} {kind} blocks per stage, which "
      f"is none of {tuple(LAYOUTS)}; give a ResNet-18, 34, 50 or 101.")


def check_matches(state: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple[int, ...]], what: str,
                  model: str) -> None:
  """Raises UserError unless ``state`` has exactly the ``expected`` keys
  (num_batches_tracked optional) with their shapes. ``what`` names the file
  and ``model`` the architecture in the message."""
  for key, shape in expected.items():
    if key not in state:
      if key.endswith(".num_batches_tracked"):
        continue
      raise UserError(f"{what} has no {key!r}, which the config's {model} "
                      "needs; set config.model (and width, small_image_stem) "
                      "to the file's architecture.")
    if tuple(np.shape(state[key])) != tuple(shape):
      raise UserError(
          f"{what} has {key!r} of shape {tuple(np.shape(state[key]))} where "
          f"the config's {model} needs {tuple(shape)}; set config.model "
          "(and width, small_image_stem) to the file's architecture.")
  extra = sorted((key for key in state if key not in expected),
                 key=_key_order)
  if extra:
    raise UserError(f"{what} has {extra[0]!r}, which the config's {model} "
                    "does not have; set config.model to the file's "
                    "architecture.")


def detectron2_name(key: str) -> str:
  """A torchvision key in detectron2's ResNet names (MoCo's convention).

  ``conv1`` -> ``stem.conv1``, ``bn1`` -> ``stem.conv1.norm``, ``layerN.i``
  -> ``res{N+1}.i``, ``bnK`` -> ``convK.norm``, ``downsample.0`` ->
  ``shortcut``, ``downsample.1`` -> ``shortcut.norm``.
  """
  parts = key.split(".")
  if not parts[0].startswith("layer"):
    parts = ["stem"] + parts
  renamed = []
  for i, part in enumerate(parts):
    layer = re.fullmatch(r"layer(\d)", part)
    norm = re.fullmatch(r"bn(\d)", part)
    if layer:
      renamed.append(f"res{int(layer[1]) + 1}")
    elif norm:
      renamed += [f"conv{norm[1]}", "norm"]
    elif part == "downsample" and parts[i + 1] in ("0", "1"):
      renamed.append("shortcut")
    elif i and parts[i - 1] == "downsample":
      if part == "1":
        renamed.append("norm")
    else:
      renamed.append(part)
  return ".".join(renamed)


def to_detectron2(state: Mapping[str, np.ndarray]) -> StateDict:
  """A torchvision backbone state under detectron2's names (values kept)."""
  return {detectron2_name(key): value for key, value in state.items()}
