#!/usr/bin/env bash
# Run eqco-jax on one host with one or more GPUs: one process drives them all.
#
#   launch/gpu_host.sh --config=configs/simo.py:imagenet_r50 --workdir=runs/simo \
#     [--setup] [-- --config.data_dir=/data/tfds ...]
#
# --setup installs this checkout with its training extra and JAX for CUDA 12
# (pip wheels bring CUDA) into the active Python environment (3.11 or newer),
# at the versions of constraints.txt.
# The global batch in the config is split over all visible GPUs
# (CUDA_VISIBLE_DEVICES picks them); TensorFlow, used only for the input
# pipeline, never touches a GPU.
set -euo pipefail

config="" workdir="" setup=0
extra=()
while (($#)); do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --setup) setup=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$config" || -z "$workdir" ]]; then
  echo "--config and --workdir are required (see the header of $0)" >&2; exit 2
fi
cd "$(dirname "$0")/.."
if ((setup)); then
  pip install -c constraints.txt -e '.[train]' \
    "jax[cuda12]==$(sed -n 's/^jax==//p' constraints.txt)"
fi
export TF_CPP_MIN_LOG_LEVEL=2
# Let XLA use most of the GPU memory (the default preallocates 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m eqco_jax.main --config="$config" --workdir="$workdir" \
  "${extra[@]+"${extra[@]}"}"
