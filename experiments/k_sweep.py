"""The paper's claim at our scale: accuracy against the number of negatives K.

  python -m experiments.k_sweep --workdir=runs/k_sweep            # digits, CPU
  python -m experiments.k_sweep --dataset=cifar10 --data_dir=DIR --model=resnet18 \
      --width=64 --steps=20000 --moco_steps=20000 --batch_size=512 \
      --image_size=32 --workdir=runs/k_cifar

For SiMo and MoCo v2, with EqCo (alpha fixed) and without (plain InfoNCE,
alpha = K), for every K and seed: pretrain with the same compute within a
method (steps, batch, model), then kNN and linear evaluation of the
backbone. SiMo draws K of its in-batch keys (the batch is large enough for
the largest K); MoCo v2 draws K entries of its queue. One row per run goes
to ``--results`` (JSON); finished runs are skipped, so the sweep can be
stopped and started again. Plots: top-1 against K and the first steps' mean
gradient norm against K.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import math
import os
import time

from absl import flags
from absl import logging

from eqco_jax.core import config as config_lib  # light: no jax, no TF
from eqco_jax.program import cli
from eqco_jax.program import storage  # light: no jax, no TF

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP1_KIND = "linear"  # which top-1 the rows' "top1" holds


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The sweep's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", "runs/k_sweep", "A workdir per run under "
                      "this.", **define)
  flags.DEFINE_string("results", os.path.join(ROOT, "results",
                                              "k_sweep.json"),
                      "The rows, one per run (JSON).", **define)
  flags.DEFINE_string("plots", os.path.join(ROOT, "results"),
                      "Where the two plots go.", **define)
  flags.DEFINE_list("methods", ["simo", "mocov2"], "Methods.", **define)
  flags.DEFINE_list("ks", ["4", "16", "64", "256"], "Negatives per query.",
                    **define)
  flags.DEFINE_list("seeds", ["0", "1"], "Seeds.", **define)
  flags.DEFINE_float("alpha", 65536.0, "EqCo's alpha.", **define)
  flags.DEFINE_string("dataset", "digits", "config.dataset.", **define)
  flags.DEFINE_string("data_dir", None, "config.data_dir.", **define)
  flags.DEFINE_string("model", "resnet10", "config.model.", **define)
  flags.DEFINE_integer("width", 8, "config.width.", **define)
  flags.DEFINE_integer("image_size", 32, "config.image_size.", **define)
  flags.DEFINE_integer("steps", 300, "SiMo's steps per run.", **define)
  flags.DEFINE_integer("moco_steps", 600, "MoCo v2's steps per run (it "
                       "learns more slowly).", **define)
  flags.DEFINE_integer("batch_size", 0, "Global batch; 0: the smallest "
                       "multiple of 8 above the largest K.", **define)
  flags.DEFINE_integer("moco_batch_size", 128, "MoCo v2's global batch.",
                       **define)


def parse_args(argv: list[str]) -> flags.FlagValues:
  """``argv`` as the command line would give it, in flags of their own."""
  return cli.parse(define_flags, argv)


def quickstart_config():
  """configs/quickstart.py's config: the small-data recipe every run shares."""
  spec = importlib.util.spec_from_file_location(
      "quickstart", os.path.join(ROOT, "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_config(args, method: str, eqco: bool, k: int, seed: int):
  """The config of one run of the sweep."""
  c = quickstart_config()
  c.method, c.eqco, c.alpha, c.seed = method, eqco, args.alpha, seed
  c.head = config_lib.METHOD_HEADS[method]
  c.dataset, c.data_dir = args.dataset, args.data_dir
  c.model, c.width, c.image_size = args.model, args.width, args.image_size
  steps = args.steps if method == "simo" else args.moco_steps
  c.num_train_steps = steps
  c.final_eval_baseline = False
  c.log_every_steps = max(1, min(20, steps // 5))
  c.checkpoint_every_steps = max(steps // 2, 1)
  c.num_negatives = k
  max_k = max(int(x) for x in args.ks)
  if method == "simo":
    c.batch_size = args.batch_size or 8 * (max_k // 8 + 1)
  else:
    c.batch_size = args.moco_batch_size
    # MoCo v2's own recipe where the BN-free head needs it: lr 0.03 per 256,
    # no zero-init of residual BN, a slow key encoder (m 0.99 for a short
    # run). With SiMo's quick-start values (lr 0.2, zero-init, m 0.95) its
    # embeddings collapse within 40 steps (README, "K sweep").
    c.base_learning_rate = 0.03
    c.zero_init_residual = False
    c.ema_momentum = 0.99
    c.queue_size = c.batch_size * math.ceil(max(k, c.batch_size) / c.batch_size)
    c.bn_group_size = min(32, c.batch_size)
    if k >= c.queue_size:
      c.num_negatives = None  # the whole queue
  return c


def run_name(method: str, eqco: bool, k: int, seed: int) -> str:
  return f"{method}_{'eqco' if eqco else 'infonce'}_k{k}_s{seed}"


def load_rows(location: str) -> list[dict]:
  return storage.read_json(storage.path(location)) or []


def save_rows(location: str, rows: list[dict]) -> None:
  target = storage.path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  storage.write_json_atomic(target, rows)


def plot(rows: list[dict], directory: str) -> list[str]:
  """top-1 vs K and initial gradient norm vs K, one panel per method."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  methods = sorted({r["method"] for r in rows})
  paths = []
  for field, ylabel, name in (
      ("top1", f"{TOP1_KIND} top-1", "k_sweep_top1.png"),
      ("initial_grad_norm", "mean gradient norm, first steps",
       "k_sweep_grad_norm.png")):
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6),
                             squeeze=False)
    for ax, method in zip(axes[0], methods):
      for eqco, style in ((True, "o-"), (False, "s--")):
        sel = [r for r in rows if r["method"] == method and r["eqco"] == eqco]
        ks = sorted({r["num_negatives"] for r in sel})
        if not ks:
          continue
        values = [[r[field] for r in sel if r["num_negatives"] == k] for k in ks]
        mean = [float(np.mean(v)) for v in values]
        spread = [float(np.std(v)) for v in values]
        label = (f"EqCo (alpha={sel[0]['alpha']:g})" if eqco
                 else "InfoNCE (alpha=K)")
        ax.errorbar(ks, mean, yerr=spread, fmt=style, capsize=3, label=label)
      ax.set_xscale("log", base=2)
      ax.set_xlabel("K, negatives per query")
      ax.set_ylabel(ylabel)
      ax.set_title({"simo": "SiMo", "mocov2": "MoCo v2"}.get(method, method))
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    path = storage.path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(path, image.getvalue())
    paths.append(os.fspath(path))
  return paths


def table(rows: list[dict]) -> str:
  """Markdown: mean (and spread) of top-1 over seeds per method, K, loss."""
  import numpy as np

  lines = ["| method | K | EqCo top-1 | InfoNCE top-1 | seeds |",
           "|---|---|---|---|---|"]
  for method in sorted({r["method"] for r in rows}, reverse=True):
    for k in sorted({r["num_negatives"] for r in rows if r["method"] == method}):
      cells, seeds = [], set()
      for eqco in (True, False):
        values = [r["top1"] for r in rows if (r["method"], r["num_negatives"],
                                             r["eqco"]) == (method, k, eqco)]
        seeds |= {r["seed"] for r in rows if (r["method"], r["num_negatives"],
                                             r["eqco"]) == (method, k, eqco)}
        cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f}"
                     if values else "-")
      lines.append(f"| {method} | {k} | {cells[0]} | {cells[1]} | "
                   f"{len(seeds)} |")
  return "\n".join(lines)


def main(args: flags.FlagValues) -> None:
  cli.import_tensorflow()
  from eqco_jax.program import train  # after the environment above

  # K outermost within a method, so that a partial sweep already compares
  # EqCo with InfoNCE at the Ks it reached.
  grid = list(itertools.product(
      args.methods, [int(k) for k in args.ks], (True, False),
      [int(s) for s in args.seeds]))
  rows = load_rows(args.results)
  done = {r["name"] for r in rows}
  start = time.time()
  for i, (method, k, eqco, seed) in enumerate(grid, 1):
    name = run_name(method, eqco, k, seed)
    if name in done:
      logging.info("[%d/%d] %s: done before, skipped", i, len(grid), name)
      continue
    config = run_config(args, method, eqco, k, seed)
    summary = train.train_and_evaluate(
        config, os.fspath(storage.path(args.workdir) / name))
    rows.append({
        "name": name, "method": method, "eqco": eqco,
        "alpha": args.alpha if eqco else float(k), "num_negatives": k,
        "seed": seed, "top1": summary["linear_top1"], "top1_kind": TOP1_KIND,
        "knn_top1": summary["knn_top1"], "steps": summary["steps"],
        "batch_size": config.batch_size, "final_loss": summary["final_loss"],
        "initial_grad_norm": summary["initial_grad_norm"],
        "dataset": args.dataset, "model": args.model, "width": args.width})
    save_rows(args.results, rows)
    logging.info("[%d/%d] %s: %s top-1 %.4f, kNN %.4f (%.1f min so far)", i,
                 len(grid), name, TOP1_KIND, summary["linear_top1"],
                 summary["knn_top1"], (time.time() - start) / 60)
  for path in plot(rows, args.plots):
    logging.info("Wrote %s", path)
  print(table(rows))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
