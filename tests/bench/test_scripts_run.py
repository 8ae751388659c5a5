"""Every script in bench/ and tools/ (a file with a ``__main__`` block) runs as the README writes
it, ``python bench/x.py ...``, from the repository root with megamoe installed and nothing else
importable (a bench that imported the tests failed for users with ``No module named 'tests'``):
each answers ``--help``.  One process runs them all (torch is imported once), each as
``__main__`` with its own directory first on ``sys.path``, as Python does for a script."""

import glob
import json
import os
import subprocess
import sys

from tests.fixtures import REPO, script_env

SCRIPTS = sorted(path for folder in ("bench", "tools") for path in glob.glob(os.path.join(REPO, folder, "*.py"))
                 if '__name__ == "__main__"' in open(path).read())  # not the modules the scripts import

DRIVER = """
import json, os, runpy, sys, traceback
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
failures = {}
for path in json.loads(sys.argv[1]):
    sys.argv = [path, "--help"]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
        failures[path] = "did not exit on --help"
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            failures[path] = f"exit status {exit_.code}"
    except BaseException:
        failures[path] = traceback.format_exc()
    finally:
        sys.path.pop(0)
print(json.dumps(failures))
"""


def test_every_bench_and_tool_runs_as_a_script(tmp_path):
    assert len(SCRIPTS) >= 10, SCRIPTS
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(SCRIPTS)], cwd=REPO, env=script_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.splitlines()[-1])
    assert not failures, "\n".join(f"{path}: {why}" for path, why in failures.items())
