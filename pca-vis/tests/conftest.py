"""Puts pca-vis/ on sys.path (main_pca then adds ../SiT-SRA for the model) and builds the tiny real
inputs the script needs: a random local VAE, an SRA training checkpoint and an original-SiT checkpoint."""
import argparse
import functools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
torch.set_num_threads(1)  # like the scripts run below (OMP_NUM_THREADS=1): tiny tensors, no thread overhead

from main_pca import SiT_models  # noqa: E402  (SiT-SRA's models, imported by main_pca)

MODEL, LATENT, RESOLUTION, NUM_CLASSES = "SiT-S/2", 8, 64, 10  # 4 x 4 tokens, 12 blocks, D = 384
TINY = ["--model", MODEL, "--resolution", str(RESOLUTION), "--num-classes", str(NUM_CLASSES), "--label_id", "3",
        "--device", "cpu"]


def run_script(*argv, check=True, env=None):
    """Runs `python argv...` in pca-vis/ with `env` added to the environment; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, *argv], cwd=TREE, env=env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def serve_from_offline_hub(hub_cache, repo, filename, source):
    """Puts the file `source` into a private Hugging Face cache `hub_cache` as `filename` of the model repository `repo`
    at revision main, laid out as a download leaves it (refs/main -> snapshots/<commit>/filename). Returns the
    environment under which huggingface_hub serves it from there, offline (as SiT-SRA/tests/conftest.py's)."""
    commit = "0" * 40
    repo_dir = Path(hub_cache) / f"models--{repo.replace('/', '--')}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copyfile(source, repo_dir / "snapshots" / commit / filename)
    return {"HF_HOME": str(Path(hub_cache).parent / "hf-home"), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}


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


@torch.no_grad()
def released_tokens(state, x, t, y, layers, num_heads, patch):
    """{K: tokens (N, T, D) after block K}, as the released pca-vis models (its sit.py and sito.py on timm's PatchEmbed,
    Attention and Mlp) compute them, written out here on a state dict: patch embedding + the stored sin-cos
    positions; timestep (cos, then sin, of t times 10000^(-i/128), through Linear-SiLU-Linear) plus label embedding;
    then per block, with (shift, scale, gate) x 2 from Linear(SiLU(c)), attention (softmax(q k^T / sqrt(d)) v, the
    unfused path) and the tanh-GELU MLP on LayerNormed, modulated tokens, each added back through its gate.

    state: a state dict; x (N, 4, h, w); t (N,) the model's times; y (N,) labels. Float32, like the released runs.
    """
    def linear(z, name):
        return F.linear(z, state[f"{name}.weight"], state[f"{name}.bias"])

    def modulate(z, shift, scale):
        return F.layer_norm(z, z.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    n, tokens, width = h.shape
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t[:, None].float() * freqs[None]
    t_emb = linear(F.silu(linear(torch.cat([torch.cos(angles), torch.sin(angles)], -1), "t_embedder.mlp.0")),
                   "t_embedder.mlp.2")
    c = t_emb + state["y_embedder.embedding_table.weight"][y]
    out = {}
    for i in range(max(layers)):
        block = f"blocks.{i}"
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = linear(F.silu(c), f"{block}.adaLN_modulation.1").chunk(6, 1)
        qkv = linear(modulate(h, shift_a, scale_a), f"{block}.attn.qkv")
        q, k, v = qkv.reshape(n, tokens, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
        attention = ((q * (width // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        h = h + gate_a[:, None] * linear(attention.transpose(1, 2).reshape(n, tokens, width), f"{block}.attn.proj")
        mlp = linear(F.gelu(linear(modulate(h, shift_m, scale_m), f"{block}.mlp.fc1"), approximate="tanh"),
                     f"{block}.mlp.fc2")
        h = h + gate_m[:, None] * mlp
        if i + 1 in layers:
            out[i + 1] = h
    return out


def released_normalised(tokens, baseline):
    """The released norm_feat of tokens (N, T, D): sit.py's LayerNorm without affine (eps 1e-6) per token, written
    out; sito.py's min-max of each channel over the tokens."""
    if baseline:
        low, high = tokens.min(1, keepdim=True).values, tokens.max(1, keepdim=True).values
        return (tokens - low) / (high - low + 1e-6)
    mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    return (tokens - mean) / torch.sqrt(var + 1e-6)


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
