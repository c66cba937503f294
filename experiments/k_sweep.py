"""The paper's claim at our scale: accuracy against the number of negatives K.

  python -m experiments.k_sweep --workdir=runs/k_sweep            # digits, CPU
  python -m experiments.k_sweep --dataset=cifar10 --data_dir=DIR --model=resnet18 \
      --width=64 --steps=20000 --moco_steps=20000 --batch_size=512 \
      --image_size=32 --workdir=runs/k_cifar

For SiMo and MoCo v2, with EqCo (alpha fixed) and without (plain InfoNCE,
alpha = K), for every K and seed: pretrain with the same compute within a
method (steps, batch, model), then kNN and linear-probe the backbone. SiMo
draws K of its in-batch keys (the batch is large enough for the largest K);
MoCo v2 draws K entries of its queue. One row per run goes to ``--results`` (JSON); finished
runs are skipped, so the sweep can be stopped and started again. Plots:
top-1 against K and the first steps' mean gradient norm against K.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import math
import os
import time

from eqco_jax import files  # light: imports neither jax nor TF

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP1_KIND = "linear"  # which top-1 the rows' "top1" holds


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/k_sweep")
  p.add_argument("--results", default=os.path.join(ROOT, "results",
                                                    "k_sweep.json"))
  p.add_argument("--plots", default=os.path.join(ROOT, "results"))
  p.add_argument("--methods", default="simo,mocov2")
  p.add_argument("--ks", default="4,16,64,256")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--alpha", type=float, default=65536.0)
  p.add_argument("--dataset", default="digits")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--model", default="resnet10")
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=300, help="SiMo's steps per run")
  p.add_argument("--moco_steps", type=int, default=600,
                 help="MoCo v2's steps per run (it learns more slowly)")
  p.add_argument("--batch_size", type=int, default=0,
                 help="global batch; 0: the smallest multiple of 8 > max K")
  p.add_argument("--moco_batch_size", type=int, default=128)
  return p.parse_args(argv)


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
  c.method, c.head, c.eqco, c.alpha, c.seed = method, method, eqco, args.alpha, seed
  c.dataset, c.data_dir = args.dataset, args.data_dir
  c.model, c.width, c.image_size = args.model, args.width, args.image_size
  steps = args.steps if method == "simo" else args.moco_steps
  c.num_train_steps = steps
  c.final_eval_baseline = False
  c.log_every_steps = max(1, min(20, steps // 5))
  c.checkpoint_every_steps = max(steps // 2, 1)
  c.num_negatives = k
  max_k = max(int(x) for x in args.ks.split(","))
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
  return files.read_json(files.path(location)) or []


def save_rows(location: str, rows: list[dict]) -> None:
  target = files.path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  files.write_json_atomic(target, rows)


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
    path = files.path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes_atomic(path, image.getvalue())
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


def main(argv=None) -> None:
  args = parse_args(argv)
  from eqco_jax import train  # after the environment above

  # K outermost within a method, so that a partial sweep already compares
  # EqCo with InfoNCE at the Ks it reached.
  grid = list(itertools.product(
      args.methods.split(","), [int(k) for k in args.ks.split(",")],
      (True, False), [int(s) for s in args.seeds.split(",")]))
  rows = load_rows(args.results)
  done = {r["name"] for r in rows}
  start = time.time()
  for i, (method, k, eqco, seed) in enumerate(grid, 1):
    name = run_name(method, eqco, k, seed)
    if name in done:
      print(f"[{i}/{len(grid)}] {name}: done before, skipped", flush=True)
      continue
    config = run_config(args, method, eqco, k, seed)
    summary = train.train_and_evaluate(
        config, os.fspath(files.path(args.workdir) / name))
    rows.append({
        "name": name, "method": method, "eqco": eqco,
        "alpha": args.alpha if eqco else float(k), "num_negatives": k,
        "seed": seed, "top1": summary["linear_top1"], "top1_kind": TOP1_KIND,
        "knn_top1": summary["knn_top1"], "steps": summary["steps"],
        "batch_size": config.batch_size, "final_loss": summary["final_loss"],
        "initial_grad_norm": summary["initial_grad_norm"],
        "dataset": args.dataset, "model": args.model, "width": args.width})
    save_rows(args.results, rows)
    elapsed = time.time() - start
    print(f"[{i}/{len(grid)}] {name}: {TOP1_KIND} top-1 "
          f"{summary['linear_top1']:.4f}, kNN {summary['knn_top1']:.4f} "
          f"({elapsed / 60:.1f} min so far)", flush=True)
  for path in plot(rows, args.plots):
    print(f"wrote {path}")
  print(table(rows))


if __name__ == "__main__":
  main()
