#!/usr/bin/env bash
# Create or update the project's virtual environment and install prunelab into it.
#
#   tools/install.sh VENV EXTRAS        e.g. tools/install.sh .venv notebooks,test
#
# torch is installed first, on its own, so that no dependency can pull a multi-GB CUDA build:
#   1. a torch the base interpreter already has is kept (the venv sees system site-packages);
#   2. else the pinned CPU wheel of constraints-cpu.txt when it lies in a pip find-links folder
#      (as on the project's CI machines);
#   3. else a normal torch release from the user's index.
# Every later install is constrained to the torch found, so it is never replaced.
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-notebooks,test}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        echo "install: keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install --quiet "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
    pinned=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$here/constraints-cpu.txt")
    links=$("$PY" -m pip config get global.find-links 2>/dev/null || true)
    links="${PIP_FIND_LINKS:-} $links"
    wheel=""
    for d in $links; do
        for f in "$d"/torch-"$pinned"+cpu-*.whl; do [ -e "$f" ] && wheel=$f; done
    done
    if [ -n "$wheel" ]; then
        echo "install: torch $pinned (CPU) from $wheel"
        pip_q -c "$here/constraints-cpu.txt" "torch==$pinned"
    else
        echo "install: torch (a normal release; for the CPU-only build on Linux set"
        echo "         PIP_INDEX_URL to PyTorch's CPU index before running make)"
        pip_q torch
    fi
fi

torch_version=$("$PY" -c "import torch; print(torch.__version__)")
echo "torch==$torch_version" > "$VENV/torch-constraint.txt"
pip_q -c "$VENV/torch-constraint.txt" -e "$here[$EXTRAS]"
"$PY" -c "import torch; assert torch.__version__ == '$torch_version', torch.__version__"
echo "install: prunelab with [$EXTRAS] in $VENV (torch $torch_version)"
