#!/usr/bin/env bash
# Creates .venv (once) and installs megamoe into it.  torch is installed only when missing, and
# then as the CPU build 2.13.0; a GPU user's own CUDA torch (system-wide) is kept and reused.
# Usage: source-free; `bash scripts/setup_env.sh [dev]`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
    if python3 -c "import torch" 2>/dev/null; then
        python3 -m venv --system-site-packages .venv   # reuse the machine's torch (e.g. CUDA)
    else
        python3 -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install -q -e ".[$extras]"
else
    .venv/bin/python -m pip install -q -e .
fi
