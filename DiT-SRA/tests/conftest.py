"""Puts this tree on sys.path so tests import its modules (models, loss, ...) by their plain names,
names the tree's model family (tests shared by both trees use MODELS and TINY_MODEL), and builds
the tiny real inputs the scripts need: a random local VAE, a latent dataset, and for generate.py a
checkpoint, its command line and one base run."""
import argparse
import copy
import json
import os
import shutil
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
# A test of behaviour that lives wholly in the shared files (byte-identical in both trees, checked by the project's
# tests/test_shared_files.py), such as an error path of training.py or sampling_io.py: SiT-SRA runs it, and DiT-SRA with
# SRA_TEST_BOTH_TREES=1; CI's time goes to what differs between the trees.
shared_behaviour = pytest.mark.skipif(FAMILY == "DiT" and not os.environ.get("SRA_TEST_BOTH_TREES"),
                                      reason="shared code, tested in SiT-SRA (SRA_TEST_BOTH_TREES=1 runs it here too)")


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


# ---------------------------------------------------------------------------------------------- generate.py
# The tiny sampling setting: N samples of RES px (latent 4x4) in batches of BATCH, CLASSES classes. SiT-S/2 is sampled
# by the SDE in 5 steps with CFG 4 on t in [0.2, 0.7]; DiT-T/2 by 5 respaced DDPM steps without guidance (gen.sh's 1.0).
RES, N, BATCH, CLASSES = 32, 10, 4, 10
SAMPLE_MODEL = {"SiT": "SiT-S/2", "DiT": "DiT-T/2"}[FAMILY]
SAMPLER_FLAGS = {"SiT": ["--num-steps", "5", "--cfg-scale", "4.0", "--guidance-low", "0.2", "--guidance-high", "0.7"],
                 "DiT": ["--num-sampling-steps", "5", "--cfg-scale", "1.0"]}[FAMILY]


def sampling_model(model_name=SAMPLE_MODEL, num_classes=CLASSES, seed=0):
    """A model (eval mode) whose zero-initialised adaLN and output layers are perturbed, so samples are not trivial."""
    import torch

    torch.manual_seed(seed)
    model = MODELS[model_name](input_size=RES // 8, num_classes=num_classes, class_dropout_prob=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def training_checkpoint(state_dict, model_name=SAMPLE_MODEL, num_classes=CLASSES):
    """The dict train.py writes; `model` and `ema` share tensors, so torch.save stores them once."""
    args = argparse.Namespace(model=model_name, resolution=RES, num_classes=num_classes, cfg_prob=0.1)
    return {"model": state_dict, "ema": state_dict, "opt": {}, "args": args, "epoch": 3, "steps": 100}


def generate_argv(ckpt, sample_dir, vae_dir, *extra):
    """generate.py's command line for the tiny setting, `extra` flags last (they win)."""
    return ["generate.py", "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--model", SAMPLE_MODEL,
            "--num-classes", str(CLASSES), "--resolution", str(RES), "--vae", str(vae_dir),
            "--per-proc-batch-size", str(BATCH), "--num-fid-samples", str(N), *SAMPLER_FLAGS, *extra]


def the_npz(sample_dir):
    """The one .npz of a sample dir (asserting there is exactly one) and the folder of its PNGs."""
    npzs = sorted(Path(sample_dir).glob("*.npz"))
    assert len(npzs) == 1, npzs
    return npzs[0], npzs[0].with_suffix("")


def run_generate(ckpt, sample_dir, vae_dir, *extra):
    """Runs generate.py in a subprocess; returns (npz path, PNG folder)."""
    run_script(*generate_argv(ckpt, sample_dir, vae_dir, *extra))
    return the_npz(sample_dir)


def serve_from_offline_hub(hub_cache, repo, filename, source):
    """Puts the file `source` into a private Hugging Face cache `hub_cache` as `filename` of the model repository `repo`
    at revision main, laid out as a download leaves it (refs/main -> snapshots/<commit>/filename). Returns the
    environment under which huggingface_hub serves it from there and never reaches for the network."""
    commit = "0" * 40
    repo_dir = Path(hub_cache) / f"models--{repo.replace('/', '--')}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copyfile(source, repo_dir / "snapshots" / commit / filename)
    return offline_hub_env(hub_cache)


def offline_hub_env(hub_cache):
    """The environment of a private Hugging Face cache `hub_cache` (and HF_HOME beside it), offline."""
    return {"HF_HOME": str(Path(hub_cache).parent / "hf-home"), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}


def gen_sh_torchrun_arguments(tmp_path, **env):
    """Runs gen.sh with the environment `env` (NUM_GPUS=4 unless given) and a stand-in torchrun that records its
    arguments; returns them (torchrun's, then generate.py and its own)."""
    (tmp_path / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    (tmp_path / "torchrun").chmod(0o755)
    full_env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"),
                "NUM_GPUS": "4", **env}
    subprocess.run(["bash", "gen.sh"], cwd=TREE, env=full_env, check=True)
    return (tmp_path / "args").read_text().splitlines()


def gen_sh_arguments(tmp_path, **env):
    """generate.py's arguments from gen.sh (see gen_sh_torchrun_arguments), asserting the torchrun part: one node,
    NUM_GPUS=4 processes."""
    recorded = gen_sh_torchrun_arguments(tmp_path, **env)
    assert recorded[:3] == ["--nnodes=1", "--nproc_per_node=4", "generate.py"]
    return recorded[3:]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A training checkpoint of sampling_model() named step-100.pt."""
    import torch

    path = tmp_path_factory.mktemp("ckpt") / "step-100.pt"
    torch.save(training_checkpoint(sampling_model().state_dict()), path)
    return path


@pytest.fixture(scope="session")
def base_run(ckpt, tiny_vae_dir, tmp_path_factory):
    """One uninterrupted single-process run of generate.py with seed 0: (npz path, PNG folder)."""
    return run_generate(ckpt, tmp_path_factory.mktemp("base"), tiny_vae_dir)


@pytest.fixture(scope="module")
def one_thread():
    """In-process torch on one thread, like the scripts' subprocesses (OMP_NUM_THREADS=1): on tiny tensors a second
    thread only adds waiting, a lot of it on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
