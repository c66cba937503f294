"""What a run is: the config fields that change what is trained.

Every checkpoint records ``identity(config)``; a restart resumes it only
with a config of the same identity. The identity is the whole config,
flattened to dotted names (``augment.crop_scale``), less ``NOT_IDENTITY``:
fields that only say where data lives, how often to log, save or evaluate,
how to evaluate, or how to compute the same numbers. Fields a method ignores
(SiMo's queue, EqCo's alpha with ``eqco=False``, epochs when
``num_train_steps`` is set, warm-up steps when ``warmup_epochs`` is) are
recorded as None, so changing them is no change. A field a checkpoint does
not record (written before the field existed) is not compared; where the
config leaves it at its neutral value (``NEUTRAL``) that is no change
either, and nothing is said.

Core layer: ml_collections and json only.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

# Fields (or whole sub-configs, by prefix) that do not change what is
# trained: changing them on a restart is allowed.
NOT_IDENTITY = (
    # Where the data is.
    "data_dir", "manual_dir", "download",
    # Cadence of logs, checkpoints and the kNN monitor.
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "eval_every_steps", "eval_every_epochs", "profile_steps",
    "compilation_cache_dir",
    # Evaluation only.
    "eval_train_split", "eval_test_split", "eval_batch_size", "knn_k",
    "knn_temperature", "final_eval", "final_eval_baseline", "linear_eval",
    "augment.eval_crop_scale",
    # The same computation elsewhere: recomputed activations, colour
    # augmentation on the accelerator instead of the host.
    "remat", "augment.on_device",
)


# Fields added since runs were first recorded, at the value that changes
# nothing (the run trains as one written before them did).
NEUTRAL = {"warmup_epochs": 0.0}


def _excluded(name: str) -> bool:
  return any(name == field or name.startswith(field + ".")
             for field in NOT_IDENTITY)


def _json_value(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def flatten(config: ml_collections.ConfigDict, prefix: str = ""
            ) -> dict[str, Any]:
  """``{'a.b': value}`` for every leaf of ``config``."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The fields recorded with each checkpoint, JSON-friendly, sorted."""
  record = {name: _json_value(value)
            for name, value in sorted(flatten(config).items())
            if not _excluded(name)}
  if record.get("method") != "mocov2":  # SiMo has no queue, no Shuffle BN.
    for name in ("queue_size", "shuffle_bn"):
      if name in record:
        record[name] = None
  if not record.get("eqco", True) and "alpha" in record:
    record["alpha"] = None  # Plain InfoNCE: alpha is not used.
  if (record.get("num_train_steps") or 0) > 0 and "num_epochs" in record:
    record["num_epochs"] = None  # num_train_steps > 0 overrides epochs.
  if (record.get("warmup_epochs") or 0) > 0 and "warmup_steps" in record:
    record["warmup_steps"] = None  # warmup_epochs > 0 overrides steps.
  return record


def first_difference(saved: dict[str, Any], wanted: dict[str, Any]
                     ) -> tuple[str, Any, Any] | None:
  """``(field, saved value, wanted value)`` of a field both records have
  and disagree on, or None.

  Fields set on both sides come first (``eqco`` rather than the ``alpha``
  it turned off), then by name. A field ``saved`` lacks (a checkpoint
  written before the field was recorded) is not compared; see
  ``unrecorded``.
  """
  different = [name for name in set(saved) & set(wanted)
               if saved[name] != wanted[name]]
  if not different:
    return None
  name = min(different, key=lambda n: (
      saved[n] is None or wanted[n] is None, n))
  return name, saved[name], wanted[name]


def unrecorded(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """Fields of ``wanted`` that ``saved`` does not record, sorted, less those
  at their neutral value."""
  return sorted(name for name in set(wanted) - set(saved)
                if name not in NEUTRAL or wanted[name] != NEUTRAL[name])
