#!/usr/bin/env bash
# pgolf set-up and entry points. Creates .venv on first use (CPU torch 2.13.0 + the project), then:
#   bash run.sh demo [hydra overrides...]   train the demo model on the Shakespeare corpus (the default job)
#   bash run.sh test [pytest args...]       run the test suite
#   bash run.sh setup                       only install
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

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/python" train.py "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
