"""Puts evaluations/ on sys.path so tests import its modules by their plain names, and builds the inputs the
evaluator needs offline: Inception weights of random values in the format of torch-fidelity's file, and .npz files."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
torch.set_num_threads(1)  # like the scripts run below (OMP_NUM_THREADS=1); the machine's cores are shared


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random-valued Inception weights file, named as torch-fidelity's download."""
    from inception import WEIGHTS_URL, random_state_dict

    path = tmp_path_factory.mktemp("weights") / WEIGHTS_URL.rsplit("/", 1)[1]
    torch.save(random_state_dict(), path)
    return path


def random_images(n, size=32, seed=0):
    """n random uint8 images (n, size, size, 3): smooth colour gradients plus noise, different per image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None, None] * rng.uniform(0, 255, (n, 1, 1, 3))
    noise = rng.uniform(0, 60, (n, size, size, 3))
    return np.clip(ramp + noise + ramp.transpose(0, 2, 1, 3), 0, 255).astype(np.uint8)


def run_evaluator(*argv, check=True, env=None):
    """Runs `python evaluator.py argv...` from the repository root, as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, "evaluations/evaluator.py", *map(str, argv)], cwd=TREE.parent,
                            env=full_env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"evaluator {argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-5000:]}")
    return result
