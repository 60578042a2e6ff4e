"""Puts evaluations/ on sys.path so tests import its modules by their plain names, and builds the inputs the
evaluator needs offline: Inception weights of random values in the format of torch-fidelity's file, and .npz files."""
import io
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


def random_inception_state_dict(seed=0):
    """torch-fidelity's InceptionV3 with random weights, as the plain state dict its weights file holds.

    Convolutions get He-normal weights and batch norms random affine and running statistics, so that activations
    neither vanish nor explode through the 20 blocks and the features differ between images."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        """The architecture alone: its constructor's load of the (unavailable) weights is skipped."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Skeleton("skeleton", ["2048"], feature_extractor_weights_path=empty)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=generator) * 0.05)
        net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=generator))
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random-valued Inception weights file, named as torch-fidelity's download."""
    from inception import WEIGHTS_URL

    path = tmp_path_factory.mktemp("weights") / WEIGHTS_URL.rsplit("/", 1)[1]
    torch.save(random_inception_state_dict(), path)
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
