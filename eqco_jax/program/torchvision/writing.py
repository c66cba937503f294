"""Writing a run's backbone for other frameworks: torchvision's ResNet
``state_dict`` (a ``.safetensors`` file, or a ``.pth`` of plain tensors) and
detectron2's pickle, with what each file records of where it came from.

Flax keeps the biased running variance and PyTorch the unbiased one: each
BN's variance is multiplied by ``n / (n - 1)``, n the values per channel of
one batch statistic in pretraining (examples per BN group x H x W of that
layer at ``image_size``). ``num_batches_tracked`` is the step.

Refused with one sentence: widths other than 64 (torchvision's ResNets are
64 wide), and for detectron2 the small-image stem and ResNet-10. The
small-image stem is written for torchvision under the same keys with a 3x3
``conv1.weight``; it loads into a torchvision ResNet whose ``conv1`` is
``Conv2d(3, 64, 3, 1, 1, bias=False)`` and ``maxpool`` is ``Identity()``.
"""

from __future__ import annotations

import io
import json
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eqco_jax.core import run_identity
from eqco_jax.core.errors import UserError
from eqco_jax.core.models.batch_norm import BatchNorm
from eqco_jax.core.training import builders
from eqco_jax.data import catalog
from eqco_jax.program.files import storage
from eqco_jax.program.torchvision import layout

FORMATS = ("torchvision", "detectron2")
TORCHVISION_WIDTH = 64
DETECTRON2_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50,
                     "resnet101": 101}
AUTHOR = "eqco-jax"


def check_exportable(config: ml_collections.ConfigDict, fmt: str,
                     out: str) -> None:
  """Raises UserError when ``fmt`` cannot express the run's backbone or
  ``out`` has the wrong extension."""
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt} is not known; use one of {FORMATS}.")
  if config.width != TORCHVISION_WIDTH:
    raise UserError(
        f"the run's width={config.width} cannot be expressed in torchvision's "
        f"or detectron2's ResNets, whose first stage is {TORCHVISION_WIDTH} "
        "channels wide; export a run made with width=64.")
  if fmt == "detectron2":
    if config.small_image_stem:
      raise UserError(
          "detectron2's ResNet stem is the 7x7 conv with max-pool, so a run "
          "with small_image_stem=True cannot be exported for it; use "
          "--format=torchvision, which documents the 3x3 stem's layout.")
    if config.model not in DETECTRON2_DEPTHS:
      raise UserError(
          f"detectron2 has no {config.model}; export a run of one of "
          f"{tuple(DETECTRON2_DEPTHS)} or use --format=torchvision.")
    if not out.endswith(".pkl"):
      raise UserError(f"--out={out} must end in .pkl for detectron2.")
  elif not out.endswith((".safetensors", ".pth")):
    raise UserError(f"--out={out} must end in .safetensors or .pth.")


def variance_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """torchvision BN name -> values per channel of one pretraining batch
  statistic: examples per BN group x H x W of that layer at image_size."""
  group = config.get("bn_group_size") or config.batch_size
  backbone = builders.backbone_of(config)
  size = config.image_size

  def shapes(x):
    return backbone.init_with_output(
        jax.random.key(0), x, train=False, mutable=True,
        capture_intermediates=lambda module, _: isinstance(module, BatchNorm))

  _, variables = jax.eval_shape(
      shapes, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  counts = {}
  for path, value in jax.tree_util.tree_leaves_with_path(
      variables["intermediates"]):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    module = layout.torch_module_name(tuple(names[:-1]))
    counts[module] = group * value.shape[1] * value.shape[2]
  return counts


def metadata(config: ml_collections.ConfigDict, step: int,
             encoder: str) -> dict[str, str]:
  """What the file records about where its weights came from (str -> str)."""
  group = config.get("bn_group_size") or config.batch_size
  stem = ("small_image: conv1 3x3 stride 1 padding 1, no max-pool"
          if config.small_image_stem else
          "imagenet: conv1 7x7 stride 2 padding 3, 3x3/2 max-pool")
  return {
      "format": "torchvision ResNet state_dict without fc",
      "exported_by": AUTHOR,
      "model": config.model,
      "method": config.method,
      "identity": json.dumps(run_identity.identity(config), sort_keys=True),
      "step": str(step),
      "encoder": encoder,
      "stem": stem,
      "bn_running_var": (
          "unbiased, as PyTorch keeps it: the run's biased running variance "
          f"x n/(n-1), n = {group} examples per BN group x H x W of each "
          f"layer at {config.image_size}x{config.image_size} inputs"),
  }


def write_torchvision(state: layout.StateDict,
                      info: dict[str, str], out: str) -> None:
  """``out.safetensors`` (with ``info`` as metadata) or ``out.pth``."""
  if out.endswith(".pth"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError(f"writing {out} needs PyTorch (pip install torch); "
                      "or write a .safetensors file, which does not.") from None
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(np.require(v, requirements="C"))
                for k, v in state.items()}, buffer)
    storage.write_bytes_atomic(storage.path(out), buffer.getvalue())
    return
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  storage.write_bytes_atomic(storage.path(out), safetensors_numpy.save(
      {k: np.require(v, requirements="C") for k, v in state.items()},
      metadata=info))


def write_detectron2(state: layout.StateDict, out: str) -> None:
  """detectron2's pickle: numpy arrays under its ResNet names."""
  storage.write_bytes_atomic(storage.path(out), pickle.dumps(
      {"model": layout.to_detectron2(state),
       "__author__": AUTHOR, "matching_heuristics": True}))


def detectron2_config(config: ml_collections.ConfigDict, out: str) -> str:
  """The detectron2 config lines that go with an exported ``out``."""
  mean, std = catalog.normalisation(config)
  mean = ", ".join(f"{255 * m:.3f}" for m in mean)
  std = ", ".join(f"{255 * s:.3f}" for s in std)
  lines = ["MODEL:", f'  WEIGHTS: "{out}"', f"  PIXEL_MEAN: [{mean}]",
           f"  PIXEL_STD: [{std}]", "  RESNETS:",
           f"    DEPTH: {DETECTRON2_DEPTHS[config.model]}",
           "    STRIDE_IN_1X1: False"]
  if config.model in ("resnet18", "resnet34"):
    lines.append("    RES2_OUT_CHANNELS: 64")
  lines += ["INPUT:", '  FORMAT: "RGB"']
  return "\n".join(lines)

