"""The paper's claim at our scale: accuracy against the number of negatives K.

  python -m experiments.k_sweep --workdir=runs/k_sweep            # digits, CPU
  python -m experiments.k_sweep --config=configs/cifar10.py:simo_r18 \
      --mocov2_config=configs/cifar10.py:mocov2_r18 \
      --config.data_dir=DIR --mocov2_config.data_dir=DIR --workdir=runs/k_cifar

For SiMo (``--config``, by default the quick start's ``k_sweep`` variant)
and MoCo v2 (``--mocov2_config``, its ``k_sweep_mocov2``), with EqCo
(alpha fixed) and without (plain InfoNCE, alpha = K), for every K and seed:
pretrain with the same compute within a method (the config's steps, batch
and model), then kNN and linear evaluation of the backbone. SiMo draws K of
its in-batch keys (its batch is raised, where needed, to the smallest
multiple of 8 above the largest K); MoCo v2 draws K entries of its queue
(made large enough for K). One row per run goes to ``--results`` (JSON);
finished runs are skipped, so the sweep can be stopped and started again.
Plots: top-1 against K and the first steps' mean gradient norm against K.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import time

import ml_collections
from absl import flags
from absl import logging
from ml_collections import config_flags

from eqco_jax.core.errors import UserError
from eqco_jax.program.commands import cli
from eqco_jax.program.files import storage  # light: no jax, no TF

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP1_KIND = "linear"  # which top-1 the rows' "top1" holds


def define_flags(flag_values: flags.FlagValues) -> None:
  """The sweep's flags, on ``flag_values``."""
  define = dict(flag_values=flag_values)
  for method, recipe in (("", "quickstart.py:k_sweep"),
                         ("mocov2_", "quickstart.py:k_sweep_mocov2")):
    config_flags.DEFINE_config_file(
        f"{method}config", os.path.join(ROOT, "configs", recipe),
        f"The {'MoCo v2' if method else 'SiMo'} runs' recipe: "
        "FILE.py[:VARIANT].", lock_config=True, **define)
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


def parse_args(argv: list[str]) -> flags.FlagValues:
  """``argv`` as the command line would give it, in flags of their own."""
  return cli.parse(define_flags, argv)


def run_config(args: flags.FlagValues, method: str, eqco: bool, k: int,
               seed: int) -> ml_collections.ConfigDict:
  """The config of one run of the sweep: the method's recipe with its
  negatives, EqCo switch, alpha and seed."""
  c = (args.config if method == "simo" else
       args.mocov2_config).copy_and_resolve_references()
  if c.method != method:
    raise UserError(f"the {method} runs' config is a {c.method} recipe; "
                    f"give --{'' if method == 'simo' else 'mocov2_'}config a "
                    f"{method} one.")
  c.eqco, c.alpha, c.seed, c.num_negatives = eqco, args.alpha, seed, k
  c.final_eval, c.final_eval_baseline = True, False
  steps = c.num_train_steps
  c.log_every_steps = max(1, min(20, steps // 5))
  c.checkpoint_every_steps = max(steps // 2, 1)
  max_k = max(int(x) for x in args.ks)
  if method == "simo":  # one batch for every K: the largest's
    c.batch_size = max(c.batch_size, 8 * (max_k // 8 + 1))
  else:
    c.queue_size = c.batch_size * math.ceil(max(k, c.batch_size) /
                                            c.batch_size)
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
  from eqco_jax.program.run import train  # after the environment above

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
        "dataset": config.dataset, "model": config.model,
        "width": config.width})
    save_rows(args.results, rows)
    logging.info("[%d/%d] %s: %s top-1 %.4f, kNN %.4f (%.1f min so far)", i,
                 len(grid), name, TOP1_KIND, summary["linear_top1"],
                 summary["knn_top1"], (time.time() - start) / 60)
  for path in plot(rows, args.plots):
    logging.info("Wrote %s", path)
  print(table(rows))


if __name__ == "__main__":
  cli.run(main, define_flags)
