#!/usr/bin/env bash
# pgolf set-up and entry points. Creates .venv on first use (CPU torch 2.13.0 + the project), then:
#   bash run.sh demo [hydra overrides...]   train the demo model on the Shakespeare corpus (the default job)
#   bash run.sh test [pytest args...]       run the test suite
#   bash run.sh setup                       only install (and lrzip, for the pergroup export codec, where it can)
# PGOLF_VENV picks another virtual-environment directory.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PGOLF_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.pgolf-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # torch first and exactly 2.13.0: on a CPU machine this resolves to the CPU build, and the project's
    # own `torch==2.13.0` requirement is then already satisfied (no CUDA wheels are pulled).
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    touch "$stamp"
  fi
}

# `lrzip` (an external program) compresses the weight groups of the pergroup export codec (PR #1611's
# per-group container, pgolf/quant/pergroup.py). Installed with apt-get where the machine allows it (root, or
# passwordless sudo); otherwise one line says so. Never fails the set-up: pergroup_brotli needs no lrzip.
setup_lrzip() {
  command -v lrzip >/dev/null 2>&1 && return 0
  local root=""
  if [ "$(id -u)" -eq 0 ]; then
    root=env
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    root="sudo -n env"
  fi
  if [ -n "$root" ] && command -v apt-get >/dev/null 2>&1; then
    local apt="$root DEBIAN_FRONTEND=noninteractive timeout 600 apt-get -y -qq"
    # install from the current package lists; refresh them only if that fails
    $apt install lrzip >/dev/null 2>&1 || { $apt update >/dev/null 2>&1 && $apt install lrzip >/dev/null 2>&1; } || true
    command -v lrzip >/dev/null 2>&1 && { echo "installed lrzip (export codec pergroup)"; return 0; }
  fi
  echo "lrzip is not installed and could not be (that needs apt-get with root or passwordless sudo): per-group lrzip" \
    "artifacts (export codec pergroup) will not be available (pergroup_brotli needs no lrzip)"
  return 0
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup; setup_lrzip || true ;;
  demo) setup; exec "$VENV/bin/python" train.py "$@" ;;
  # The suite starts many Python subprocesses (train.py, eval.py, torchrun); compiling the project's modules
  # once first saves each of them ~1 s where PYTHONDONTWRITEBYTECODE keeps Python from caching bytecode.
  # The tests run in parallel (pytest-xdist), one worker per core up to 4, each on one thread
  # (OMP_NUM_THREADS=1, which the subprocesses a test starts inherit): on 2 cores this takes the suite from
  # ~440 s to ~315 s. `bash run.sh test -n 0` runs it serially; a later `-n` wins.
  test)
    setup
    "$VENV/bin/python" -m compileall -q pgolf callbacks train.py eval.py >/dev/null
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$VENV/bin/python" -m pytest -q -n auto --maxprocesses 4 "$@" ;;
  *) echo "usage: bash run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
