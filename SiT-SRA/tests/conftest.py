"""Puts this tree on sys.path so tests import its modules (models, loss, ...) by their plain names,
names the tree's model family (tests shared by both trees use MODELS and TINY_MODEL), and builds
the tiny real inputs the scripts need: a random local VAE and a latent dataset."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))

import models  # noqa: E402 (this tree's, now on sys.path)

FAMILY = models.FAMILY  # "SiT" or "DiT"
MODELS = getattr(models, f"{FAMILY}_models")
MODEL_CLASS = getattr(models, FAMILY)
TINY_MODEL = f"{FAMILY}-T/2"


def run_script(*argv, env=None, check=True, timeout=600):
    """Runs `python argv...` (or torchrun when argv starts with it) in this tree; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = list(argv) if argv[0] in ("torchrun",) else [sys.executable, *argv]
    if cmd[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    result = subprocess.run(cmd, cwd=TREE, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def write_latent_dataset(root, num_items, resolution, num_classes, seed=0):
    """The real on-disk format (dataset.py's docstring): vae-sd/dataset.json + float32 (8, r/8, r/8) files."""
    rng = np.random.default_rng(seed)
    vae_dir = Path(root) / "vae-sd"
    labels = []
    for i in range(num_items):
        name = f"{i // 1000:05d}/img-mean-std-{i:08d}.npy"
        (vae_dir / name).parent.mkdir(parents=True, exist_ok=True)
        mean = rng.standard_normal((4, resolution // 8, resolution // 8)).astype(np.float32) * 5
        std = rng.uniform(0.01, 0.1, size=mean.shape).astype(np.float32)
        np.save(vae_dir / name, np.concatenate([mean, std]))
        labels.append([name, int(rng.integers(num_classes))])
    (vae_dir / "dataset.json").write_text(json.dumps({"labels": labels}))
    return Path(root)


def student_and_teacher():
    """A 4-block model of width 32 on 8x8 latents with perturbed weights, and a teacher close to it
    (a frozen copy, perturbed again): the losses and their gradients are not trivial."""
    import torch

    torch.manual_seed(0)
    model = MODEL_CLASS(input_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, teacher


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL (downsampling 8, 4 latent channels), saved to a folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def latent_data_dir(tmp_path_factory):
    """24 random latents of 32 px images with labels in 0..9."""
    return write_latent_dataset(tmp_path_factory.mktemp("data"), num_items=24, resolution=32, num_classes=10)
