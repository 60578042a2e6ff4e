"""Puts pca-vis/ on sys.path (main_pca then adds ../SiT-SRA for the model) and builds the tiny real
inputs the script needs: a random local VAE, an SRA training checkpoint and an original-SiT checkpoint."""
import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
torch.set_num_threads(1)  # like the scripts run below (OMP_NUM_THREADS=1): tiny tensors, no thread overhead

from main_pca import SiT_models  # noqa: E402  (SiT-SRA's models, imported by main_pca)

MODEL, LATENT, RESOLUTION, NUM_CLASSES = "SiT-S/2", 8, 64, 10  # 4 x 4 tokens, 12 blocks, D = 384
TINY = ["--model", MODEL, "--resolution", str(RESOLUTION), "--num-classes", str(NUM_CLASSES), "--label_id", "3",
        "--device", "cpu"]


def run_script(*argv, check=True):
    """Runs `python argv...` in pca-vis/; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *argv], cwd=TREE, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@functools.lru_cache(maxsize=None)
def tiny_sit(learn_sigma=False):
    """A tiny SiT (SRA, or with learn_sigma an original-SiT layout) in eval mode whose zero-initialised weights (adaLN, final layer, biases) are drawn from
    N(0, 0.02), else every block would be the identity. Cached: callers must not modify it."""
    torch.manual_seed(int(learn_sigma))
    model = SiT_models[MODEL](input_size=LATENT, num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL (downsampling 8, 4 latent channels), saved to a folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sra_ckpt(tmp_path_factory):
    """A training checkpoint as SiT-SRA/train.py writes it: {model, ema, opt, args, epoch, steps}."""
    ema = tiny_sit()
    model = SiT_models[MODEL](input_size=LATENT, num_classes=NUM_CLASSES)  # the raw weights are not used
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args = argparse.Namespace(model=MODEL, resolution=RESOLUTION, num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("sra") / "0000100.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args,
                "epoch": 1, "steps": 100}, path)
    return path


@pytest.fixture(scope="session")
def sit_ckpt(tmp_path_factory):
    """A bare state dict like SiT's released SiT-XL-2-256x256.pt: learned sigma (8 channels), no ap_head."""
    state = {k: v for k, v in tiny_sit(learn_sigma=True).state_dict().items() if not k.startswith("ap_head.")}
    path = tmp_path_factory.mktemp("sit") / "SiT-S-2-64x64.pt"
    torch.save(state, path)
    return path
