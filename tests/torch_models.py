"""torchvision ResNets with random weights and BN statistics, for the export
and import tests (import as ``import torch_models``; needs the test extra)."""

from __future__ import annotations

import sys
import types

import numpy as np


def import_torchvision():
  """``torchvision``, importable beside the CPU build of torch.

  The torchvision wheel on PyPI carries C++ operators built for the CUDA
  torch; beside the CPU torch wheel, ``import torchvision`` fails in
  ``torchvision._meta_registrations`` ("operator torchvision::nms does not
  exist"), which registers fake kernels for those operators. The ResNet
  code is pure Python and needs none of them, so that module is replaced
  by an empty one before torchvision is imported.
  """
  if "torchvision" not in sys.modules:
    sys.modules.setdefault(
        "torchvision._meta_registrations",
        types.ModuleType("torchvision._meta_registrations"))
  import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision


def random_resnet(name: str, seed: int = 0, small_image: bool = False):
  """``torchvision.models.<name>()`` in eval mode with every weight and BN
  statistic random (variances in [0.5, 2]), ``num_batches_tracked`` 7.

  ``small_image``: the 3x3/1 stem without max-pool (eqco-jax's
  small-image stem).
  """
  import torch  # pylint: disable=g-import-not-at-top
  torchvision = import_torchvision()
  torch.manual_seed(seed)
  model = getattr(torchvision.models, name)()
  if small_image:
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.0, 0.2, generator=generator)
        module.running_mean.normal_(0.0, 0.2, generator=generator)
        module.running_var.uniform_(0.5, 2.0, generator=generator)
        module.num_batches_tracked.fill_(7)
  return model.eval()


def features(model, images: np.ndarray) -> np.ndarray:
  """Pooled backbone features ``[N, C]`` of NHWC float ``images``."""
  import torch  # pylint: disable=g-import-not-at-top
  fc, model.fc = model.fc, torch.nn.Identity()
  try:
    with torch.no_grad():
      x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
      return model(x).numpy()
  finally:
    model.fc = fc


def state_arrays(model) -> dict[str, np.ndarray]:
  """``model.state_dict()`` as numpy arrays, ``fc.*`` left out."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if not k.startswith("fc.")}


def assert_relative(actual, expected, tolerance: float = 1e-4) -> None:
  """Every entry within ``tolerance`` of the largest magnitude."""
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_allclose(actual, expected, rtol=tolerance,
                             atol=tolerance * scale)


def jax_features(config, variables, images: np.ndarray) -> np.ndarray:
  """eqco-jax's backbone features ``[N, C]`` of NHWC ``images`` in
  inference mode, for the config's architecture."""
  import jax  # pylint: disable=g-import-not-at-top

  from eqco_jax.core.training import builders  # pylint: disable=g-import-not-at-top
  backbone = builders.backbone_of(config)
  return np.asarray(jax.jit(
      lambda v, x: backbone.apply(v, x, train=False))(variables, images))


def moco_detectron2_keys(state: dict) -> set:
  """What MoCo's convert-pretrain-to-detectron2.py names the encoder_q keys
  of a checkpoint, written here from its documented behaviour."""
  names = set()
  for key in state:
    if not key.startswith("module.encoder_q."):
      continue
    k = key.replace("module.encoder_q.", "")
    if "layer" not in k:
      k = "stem." + k
    for t in (1, 2, 3, 4):
      k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
      k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    names.add(k)
  return names


# The ResNet-18 that conftest.imported_run starts from: torchvision's
# initialisation under this seed.
IMPORTED_SEED = 5


def torchvision_resnet18(seed: int | None = None):
  """``torchvision.models.resnet18()``, initialised under ``seed``."""
  import torch  # pylint: disable=g-import-not-at-top
  if seed is not None:
    torch.manual_seed(seed)
  return import_torchvision().models.resnet18()
