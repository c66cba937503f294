"""Export a run's backbone for torchvision, timm or detectron2.

``python -m eqco_jax.export --workdir=RUN [--step=N] [--encoder=online|momentum]
[--format=torchvision|detectron2] --out=FILE``

- ``torchvision`` (default): ``FILE.safetensors`` with exactly the keys and
  shapes of ``torchvision.models.resnet{18,34,50,101}().state_dict()`` less
  ``fc.*``, float32 (int64 ``num_batches_tracked``), written with
  ``safetensors.numpy``: no PyTorch needed. Its metadata records the method,
  the config identity, the step, the encoder and how the BN variances were
  converted. ``FILE.pth`` is a plain dict of tensors (needs PyTorch).
- ``detectron2``: ``FILE.pkl``, a pickle of numpy arrays under detectron2's
  ResNet names (MoCo's convention) with ``matching_heuristics``; the config
  lines that go with it are printed.

How each format is written, and what it refuses: ``torchvision.writing``.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import flags

from eqco_jax.core.errors import UserError
from eqco_jax.program import logs
from eqco_jax.program.files import checkpointing
from eqco_jax.program.files.workdir import Workdir
from eqco_jax.program.torchvision import layout
from eqco_jax.program.torchvision import writing

ENCODERS = ("online", "momentum")
_ENCODER_FIELDS = {"online": ("params", "batch_stats"),
                   "momentum": ("momentum_params", "momentum_batch_stats")}


def backbone_state(workdir: Workdir, config: ml_collections.ConfigDict, *,
                   step: int | None = None, encoder: str = "online"
                   ) -> tuple[layout.StateDict, int]:
  """``(torchvision state without fc, step)`` of a run's checkpoint
  ``step``, or of its newest intact one (``checkpointing.load_state_arrays``:
  each read is checked against the checkpoint's digests)."""
  if encoder not in ENCODERS:
    raise UserError(f"--encoder={encoder} is not known; use one of "
                    f"{ENCODERS}.")
  arrays = checkpointing.load_state_arrays(workdir, step)
  step = int(arrays["step"])
  params_field, stats_field = _ENCODER_FIELDS[encoder]
  variables = {"params": arrays[params_field]["backbone"],
               "batch_stats": arrays[stats_field]["backbone"]}
  variables = jax.tree.map(np.asarray, variables)
  state = layout.to_torchvision(
      variables, num_batches_tracked=step,
      variance_counts=writing.variance_counts(config))
  return state, step


def export(workdir: str | Workdir, out: str, *, step: int | None = None,
           encoder: str = "online", fmt: str = "torchvision"
           ) -> dict[str, str]:
  """Writes the run's backbone to ``out``; returns the recorded metadata."""
  workdir = Workdir(workdir) if not isinstance(workdir, Workdir) else workdir
  config = workdir.read_run_config(flag="--workdir")
  writing.check_exportable(config, fmt, out)
  state, step = backbone_state(workdir, config, step=step, encoder=encoder)
  info = writing.metadata(config, step, encoder)
  if fmt == "detectron2":
    writing.write_detectron2(state, out)
  else:
    writing.write_torchvision(state, info, out)
  return info


def define_flags(flag_values: flags.FlagValues) -> None:
  """The command's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The pretraining run's --workdir.",
                      **define)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).",
                       **define)
  flags.DEFINE_enum("encoder", "online", ENCODERS,
                    "online (query) or momentum (key) encoder's backbone.",
                    **define)
  flags.DEFINE_enum("format", "torchvision", writing.FORMATS,
                    "torchvision (.safetensors/.pth) or detectron2 (.pkl).",
                    **define)
  flags.DEFINE_string("out", None, "The file to write.", **define)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=flag_values)


def main(args: flags.FlagValues) -> None:
  """Writes the backbone and says where, with detectron2's config lines.

  Raises:
    UserError: the run cannot be exported as asked (one sentence).
  """
  logs.quiet_libraries()  # orbax's ~40 INFO lines of a restore
  workdir = Workdir(args.workdir)
  info = export(workdir, args.out, step=args.step, encoder=args.encoder,
                fmt=args.format)
  print(f"Wrote the {info['encoder']} backbone of {args.workdir} at step "
        f"{info['step']} ({info['model']}) to {args.out}.")
  if args.format == "detectron2":
    print("detectron2 config for these weights:\n" + writing.detectron2_config(
        workdir.read_run_config(flag="--workdir"), args.out))
  elif "small_image" in info["stem"]:
    print("The small-image stem: load into a torchvision ResNet whose conv1 "
          "is Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool Identity().")
