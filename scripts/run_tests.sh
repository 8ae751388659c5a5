#!/usr/bin/env bash
# Sets up .venv with the dev extras and runs the test suite.  Extra arguments go to pytest.
# Tests marked `slow` run only with MEGAMOE_RUN_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
marker=(-m "not slow")
if [ "${MEGAMOE_RUN_SLOW:-0}" = "1" ]; then marker=(); fi
exec .venv/bin/python -m pytest -q "${marker[@]}" --timeout 900 "$@"
