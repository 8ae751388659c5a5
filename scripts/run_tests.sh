#!/usr/bin/env bash
# Sets up .venv with the dev extras and runs the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
exec .venv/bin/python -m pytest -q --timeout 900 "$@"
