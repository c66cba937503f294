#!/usr/bin/env bash
# One process of a multi-node run without SLURM: start it on every node.
#
#   # on node 0 (the coordinator, reachable as node0:1234 from the others):
#   launch/multinode.sh --coordinator=node0:1234 --num_processes=2 --process_id=0 \
#     --config=configs/simo.py:imagenet_r50 --workdir=/shared/runs/simo
#   # on node 1: the same with --process_id=1
#
# Each process drives the GPUs of its node; the mesh spans all of them.
set -euo pipefail

coordinator="" num="" id="" config="" workdir=""
extra=()
while (($#)); do
  case "$1" in
    --coordinator=*) coordinator="${1#*=}" ;;
    --num_processes=*) num="${1#*=}" ;;
    --process_id=*) id="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for required in coordinator num id config workdir; do
  if [[ -z "${!required}" ]]; then
    echo "--${required/num/num_processes} is required (see the header of $0)" >&2
    exit 2
  fi
done
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=2
exec python -m eqco_jax.main --config="$config" --workdir="$workdir" \
  --coordinator_address="$coordinator" --num_processes="$num" \
  --process_id="$id" "${extra[@]+"${extra[@]}"}"
