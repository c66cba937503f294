#!/usr/bin/env bash
# N processes on this machine, talking over loopback, each with its own CPU
# devices: multi-host training on a laptop, and what the tests use.
#
#   launch/local_processes.sh --num_processes=2 --devices_per_process=4 \
#     --config=configs/quickstart.py --workdir=runs/two_processes [-- overrides]
#
# Logs go to WORKDIR/process_I.log. If one process fails or dies, the others
# are stopped (SIGTERM, SIGKILL 5 s later: they wait in collectives that will
# never complete, and no checkpoint can be saved without every process), as
# torchrun or srun would stop them. The script then exits with the first
# failure's status; the same command resumes from the last checkpoint.
# Each process gets its device count added after your own XLA_FLAGS.
set -euo pipefail

num=2 per=4 config="" workdir="" port="${PORT:-12355}"
extra=()
while (($#)); do
  case "$1" in
    --num_processes=*) num="${1#*=}" ;;
    --devices_per_process=*) per="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$config" || -z "$workdir" ]]; then
  echo "--config and --workdir are required (see the header of $0)" >&2; exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$workdir"
pids=()
for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 \
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$per" \
    python -m eqco_jax.main --config="$config" --workdir="$workdir" \
      --coordinator_address="127.0.0.1:$port" --num_processes="$num" \
      --process_id="$i" "${extra[@]+"${extra[@]}"}" \
      >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
# A Ctrl-C (or SIGTERM) to this script is a preemption notice to every
# process: each saves the same step and exits 0 (the processes themselves
# ignore SIGINT, as jobs started with & by a script do).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
# Poll rather than `wait -n`, which the bash of macOS lacks.
status=0 killer=""
while ((${#pids[@]})); do
  sleep 1
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    unset "pids[$i]"
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "process $i exited with status $rc: stopping the others;" \
        "the same command resumes from the last checkpoint" >&2
      if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        (sleep 5; kill -KILL "${pids[@]}" 2>/dev/null || true) \
          >/dev/null 2>&1 &
        killer=$!
      fi
    fi
  done
done
if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null || true; fi
exit "$status"
