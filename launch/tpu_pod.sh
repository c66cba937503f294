#!/usr/bin/env bash
# Run eqco-jax on every worker of a Cloud TPU VM (a single host or a pod slice).
#
#   launch/tpu_pod.sh --name=my-v4-64 --zone=us-central2-b \
#     --config=configs/simo.py:imagenet_r50_large --workdir=gs://BUCKET/runs/simo \
#     [--project=PROJECT] [--setup [--python=3.11] [--wheels=DIR]] \
#     [-- --config.data_dir=gs://BUCKET/tfds ...]
#   launch/tpu_pod.sh --setup --name=my-v4-64 --zone=us-central2-b  # setup only
#
# --setup (once per TPU VM) copies this checkout to ~/eqco-jax on every worker,
# replacing an earlier copy, and runs launch/tpu_vm_setup.sh there: it installs
# uv 0.13.8 (`python3 -m pip install --user`, unless uv is on PATH), makes
# ~/eqco-jax/.venv with Python 3.11 (TPU VM images ship 3.10, so uv downloads
# a standalone 3.11; --python=PATH picks an interpreter on the workers instead)
# and installs this checkout with its training extra and jax[tpu] (which
# brings libtpu) at the versions of constraints.txt. --wheels=DIR: a local
# folder of wheels, copied to the workers, to install from instead of PyPI.
#
# Without --config and --workdir, --setup is all it does.
#
# Every worker runs the same command with ~/eqco-jax/.venv/bin/python;
# jax.distributed finds the pod's coordinator by itself. Data and workdir
# should be on a bucket that all workers reach. After a preemption or
# maintenance event, run the same command again (without --setup): the run
# resumes from the newest complete checkpoint. If one worker dies, JAX's
# coordination service stops the others once it misses their heartbeats.
set -euo pipefail

name="" zone="" config="" workdir="" setup=0 project="" python="" wheels=""
extra=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --setup) setup=1 ;;
    --python=*) python="${1#*=}" ;;
    --wheels=*) wheels="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
run=1
if ((setup)) && [[ -z "$config$workdir" ]]; then run=0; fi
required=(name zone)
((run)) && required+=(config workdir)
for required in "${required[@]}"; do
  if [[ -z "${!required}" ]]; then
    echo "--$required is required (see the header of $0)" >&2; exit 2
  fi
done
if ((!setup)) && [[ -n "$python$wheels" ]]; then
  echo "--python and --wheels go with --setup (see the header of $0)" >&2
  exit 2
fi

where=(--zone "$zone" --worker=all)
[[ -n "$project" ]] && where+=(--project "$project")
ssh=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}")
here="$(cd "$(dirname "$0")/.." && pwd)"

if ((setup)); then
  staging="$(mktemp -d)"
  trap 'rm -rf "$staging"' EXIT
  tar -czf "$staging/eqco-jax.tar.gz" -C "$here" --exclude-vcs \
    --exclude=./.venv --exclude=./runs --exclude=__pycache__ \
    --exclude='*.egg-info' .
  "${ssh[@]}" --command "rm -rf ~/eqco-jax ~/eqco-jax.tar.gz ~/eqco-jax-wheels"
  gcloud compute tpus tpu-vm scp "$staging/eqco-jax.tar.gz" \
    "$name:~/eqco-jax.tar.gz" "${where[@]}"
  options=""
  [[ -n "$python" ]] && options+=" $(printf -- '--python=%q' "$python")"
  if [[ -n "$wheels" ]]; then
    gcloud compute tpus tpu-vm scp --recurse "$wheels" "$name:~/eqco-jax-wheels" \
      "${where[@]}"
    options+=' --wheels=$HOME/eqco-jax-wheels'
  fi
  "${ssh[@]}" --command "mkdir ~/eqco-jax && \
    tar -xzf ~/eqco-jax.tar.gz -C ~/eqco-jax && rm ~/eqco-jax.tar.gz && \
    bash ~/eqco-jax/launch/tpu_vm_setup.sh$options"
fi
((run)) || exit 0

printf -v args ' %q' "--config=$config" "--workdir=$workdir" \
  "${extra[@]+"${extra[@]}"}"
"${ssh[@]}" --command "cd ~/eqco-jax && \
  TF_CPP_MIN_LOG_LEVEL=2 exec .venv/bin/python -m eqco_jax.main$args"
