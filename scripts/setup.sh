#!/usr/bin/env bash
# Build rca's virtual environment in .venv (or $VENV), idempotently.
#
# torch first, chosen by the machine: where no NVIDIA GPU is visible, the CPU wheel
# torch==2.13.0 (a bare `torch>=x` would pull a multi-GB CUDA build); where one is, the
# ordinary build. Then rca itself, editable, with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: GPU found, installing torch (CUDA build)"
        "${PIP[@]}" install "torch>=2.11"
    else
        echo "setup: no GPU, installing the CPU wheel torch==2.13.0"
        "${PIP[@]}" install "torch==2.13.0"
    fi
fi

echo "setup: installing rca and its dependencies"
# pip keeps the torch installed above: it satisfies the project's lower bound
# (pipefail keeps pip's exit status; the filter only drops a harmless warning about local indexes)
"${PIP[@]}" install -e ".[dev]" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$VENV/bin/python" -c "import rca, torch; print(f'setup: rca {rca.__version__}, torch {torch.__version__}')"
