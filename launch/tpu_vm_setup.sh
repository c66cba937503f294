#!/usr/bin/env bash
# Install this checkout on one Cloud TPU VM worker; tpu_pod.sh --setup runs it
# on every worker after copying the checkout to ~/eqco-jax:
#
#   bash launch/tpu_vm_setup.sh [--python=3.11] [--wheels=DIR] [--jax_extra=tpu]
#
# 1. uv 0.13.8, by `python3 -m pip install --user` unless uv is on PATH (from
#    DIR with --wheels);
# 2. .venv in this checkout (an earlier one is replaced) with --python: a
#    version, which uv downloads as a standalone build when the machine lacks
#    it (TPU VM images ship 3.10; eqco-jax needs 3.11 or newer), or the path
#    of an interpreter;
# 3. `uv pip install -c constraints.txt -e '.[train]' 'jax[tpu]==V'`, V being
#    constraints.txt's jax: this checkout, its training dependencies and
#    libtpu. --wheels=DIR installs from DIR only (no index); --jax_extra
#    names another jax extra (cuda12, or none for CPU).
set -euo pipefail

python=3.11 wheels="" jax_extra=tpu
while (($#)); do
  case "$1" in
    --python=*) python="${1#*=}" ;;
    --wheels=*) wheels="${1#*=}" ;;
    --jax_extra=*) jax_extra="${1#*=}" ;;
    *) echo "unknown flag $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
index=()
[[ -n "$wheels" ]] && index=(--no-index --find-links "$wheels")
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null; then
  python3 -m pip install --user "${index[@]+"${index[@]}"}" uv==0.13.8
fi
if [[ -L .venv ]]; then
  echo "$PWD/.venv is a link: not replacing what it points to" >&2; exit 2
fi
uv venv --clear --python "$python" .venv
jax_version="$(sed -n 's/^jax==//p' constraints.txt)"
jax="jax==$jax_version"
[[ "$jax_extra" != none ]] && jax="jax[$jax_extra]==$jax_version"
uv pip install --python .venv/bin/python "${index[@]+"${index[@]}"}" \
  -c constraints.txt -e '.[train]' "$jax"
.venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
echo "eqco-jax installed in $PWD/.venv"
