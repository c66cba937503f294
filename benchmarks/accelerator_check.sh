#!/usr/bin/env bash
# One prepared device check: the step benchmark of every method on every local
# accelerator, one JSON line per measurement, then a short table.
#
#   benchmarks/accelerator_check.sh [--tiny] [--wheels=DIR] [--steps=N]
#
# The measurements are benchmarks/accelerator_check.py, in one process. Runs
# from a copy of this repository on a host with only jax, flax and optax
# installed (no TensorFlow, tensorflow-datasets or clu: the benchmark imports
# the core alone). ml_collections (pure Python) is taken from a wheel in
# --wheels (default: wheels/ beside this repository's root) when it is not
# installed; fetch it beforehand on a machine with a package registry:
#   pip download --no-deps ml-collections==1.1.0 -d wheels/
#
# Measures ResNet-50 at 224 in bfloat16, per-device batch 256, synthetic
# device-resident input: supervised, SiMo (asymmetric), SiMo --symmetric,
# MoCo v2, and SiMo with the colour augmentation on the device; images/s,
# step ms, GFLOP per image, MFU against the device's bf16 peak, peak device
# memory, and SiMo's images/s over the supervised step's. About 5 minutes on
# one GPU. --tiny is the CPU path (ResNet-10 of width 4 at 16x16, 8 host
# devices, added after your own XLA_FLAGS) that the test suite runs.
set -euo pipefail

tiny=0 steps=20 wheels=""
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=1 ;;
    --steps=*) steps="${arg#*=}" ;;
    --wheels=*) wheels="${arg#*=}" ;;
    *) echo "unknown flag $arg (see the header of $0)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
wheels=${wheels:-wheels}
if ! "$python" -c "import ml_collections" 2>/dev/null; then
  wheel=$(ls "$wheels"/ml_collections-*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z "$wheel" ]]; then
    echo "ml_collections is not installed and no ml_collections-*.whl is in" \
      "$wheels/: run 'pip download --no-deps ml-collections==1.1.0 -d" \
      "$wheels/' where a registry is reachable, then copy it here." >&2
    exit 1
  fi
  export PYTHONPATH="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")${PYTHONPATH:+:$PYTHONPATH}"
fi

flags=(--steps="$steps")
if ((tiny)); then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=8"
  flags+=(--tiny)
fi
exec "$python" -m benchmarks.accelerator_check "${flags[@]}"
