#!/usr/bin/env bash
# Run eqco-jax on every worker of a Cloud TPU VM (a single host or a pod slice).
#
#   launch/tpu_pod.sh --name=my-v4-64 --zone=us-central2-b \
#     --config=configs/simo.py:imagenet_r50 --workdir=gs://BUCKET/runs/simo \
#     [--setup] [-- --config.data_dir=gs://BUCKET/tfds ...]
#
# --setup copies this checkout to every worker and installs it with JAX for TPU
# (once per TPU VM). Every worker then runs the same command; jax.distributed
# finds the pod's coordinator by itself. Data and workdir should be on a bucket
# that all workers reach. After a preemption or maintenance event, run the same
# command again: the run resumes from the newest complete checkpoint.
set -euo pipefail

name="" zone="" config="" workdir="" setup=0 project=""
extra=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --setup) setup=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for required in name zone config workdir; do
  if [[ -z "${!required}" ]]; then
    echo "--$required is required (see the header of $0)" >&2; exit 2
  fi
done

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all)
[[ -n "$project" ]] && gcloud_ssh+=(--project "$project")
here="$(cd "$(dirname "$0")/.." && pwd)"

if ((setup)); then
  scp_cmd=(gcloud compute tpus tpu-vm scp --recurse "$here" "$name:~/eqco-jax"
           --zone "$zone" --worker=all)
  [[ -n "$project" ]] && scp_cmd+=(--project "$project")
  "${scp_cmd[@]}"
  "${gcloud_ssh[@]}" --command "cd ~/eqco-jax && pip install -e '.[train]' 'jax[tpu]'"
fi

printf -v extra_args ' %q' "${extra[@]+"${extra[@]}"}"
"${gcloud_ssh[@]}" --command "cd ~/eqco-jax && \
  TF_CPP_MIN_LOG_LEVEL=2 python3 -m eqco_jax.main --config=$config \
  --workdir=$workdir$extra_args"
