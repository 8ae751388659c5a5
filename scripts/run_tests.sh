#!/usr/bin/env bash
# Sets up .venv with the dev and gpu extras (the gpu extra's Triton kernels are tested on CPU,
# interpreted) and runs the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,gpu
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
