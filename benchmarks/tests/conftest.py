"""Puts benchmarks/ on sys.path, so tests import `common` and, through `common.import_tree`, one
tree's modules at a time; runs the benchmark scripts in subprocesses."""
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))


def run_script(*argv, env=None):
    """Runs `python benchmarks/argv...` from the repository root; returns its stdout."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, *argv], cwd=BENCHMARKS.parent, env=full_env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout
