"""Helpers shared by this tree's scripts: user errors, safe checkpoint I/O, the VAE, images.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import argparse
import atexit
import os
import pickle
import re
import secrets
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LATENT_SCALE = 0.18215
VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
RELEASED_REPO = "DyJiang/SRA"  # the authors' Hugging Face repository of the released checkpoints
# The released checkpoints by name, with their model (the released README's table) and the guidance of their FID
# (the released gen.sh and README: CFG 1.8 up to t = 0.7 at 256 px, CFG 2.5 with an interval at 512 px, whose bound
# the README does not give; 0.7 is assumed, as in gen.sh).
RELEASED_CHECKPOINTS = {
    "sitxl-sra-res256-ep800.pt": {"model": "SiT-XL/2", "resolution": 256, "num_classes": 1000, "cfg_scale": 1.8,
                                  "guidance_high": 0.7},
    "sitxl-sra-res512-ep400.pt": {"model": "SiT-XL/2", "resolution": 512, "num_classes": 1000, "cfg_scale": 2.5,
                                  "guidance_high": 0.7}}


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a file). Scripts print it on one line and exit 2."""


def error_reason(error):
    """The first line of an exception's message (libraries' messages run on for lines), or its type's name."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def run_main(main):
    """Runs a script's main(); a UserError becomes `error: ...` on stderr and exit status 2.

    A run with a gloo process group (several processes on CPUs) ends through `exit_before_finalization`.
    """
    status, gloo = 0, False
    try:
        main()
    except UserError as e:
        # A DataLoader worker's error arrives wrapped in its traceback; its last line is the message.
        message = str(e).strip().splitlines()[-1].removeprefix("utils.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        status = 2
    finally:
        # A process group left for the interpreter's exit to tear down can abort it (gloo: "terminate called
        # without an active exception"), failing a run that had finished.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gloo = torch.distributed.get_backend() == "gloo"
            torch.distributed.destroy_process_group()
    if gloo:
        exit_before_finalization(status)
    if status:
        sys.exit(status)


def exit_before_finalization(status):
    """Runs the atexit handlers (trackers, logging), flushes stdout and stderr, and ends the process with `status`
    without the interpreter's finalization.

    torch's DistributedDataParallel keeps its gloo process group alive after destroy_process_group (torch 2.14), and
    with it gloo's worker threads. One of them that releases a finished collective while the interpreter finalizes
    needs the GIL for the collective's tensors and is ended by Python there, which aborts the process ("terminate
    called without an active exception", seen in about 1 of 300 two-process runs on 2 cores); os._exit leaves no
    finalization for it to meet.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def positive_int(text):
    """argparse type: an integer >= 1 (a step count, a batch size, a period)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text):
    """argparse type: an integer >= 0 (where 0 means never or none)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def load_checkpoint(path, flag="--ckpt"):
    """Loads a checkpoint with weights_only=True, allowing the argparse.Namespace that released
    checkpoints pickle under 'args' and nothing else; any failure is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = found.group(1) if found else "an object that is not a tensor"
        raise UserError(f"{flag} {path}: refused to load: the file pickles {what}, and only tensors and "
                        "argparse.Namespace are trusted") from None
    except (RuntimeError, EOFError, OSError) as e:
        reason = error_reason(e)
        raise UserError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt: {reason})") from None


def checkpoint_file(ckpt, flag="--ckpt", models=None):
    """The file of --ckpt: an existing path as given; a released name (RELEASED_CHECKPOINTS) that is not one is
    downloaded once from the Hugging Face repository RELEASED_REPO into the hub cache (HF_HOME, HF_HUB_CACHE), which
    later runs read without the network. Offline or with the hub unreachable, a one-line UserError. models: a
    generate.py's model names; a released name of another model is refused before its download."""
    name = Path(ckpt).name
    if Path(ckpt).exists() or ckpt != name or name not in RELEASED_CHECKPOINTS:
        return Path(ckpt)
    released_model = RELEASED_CHECKPOINTS[name]["model"]
    if models is not None and released_model not in models:
        raise UserError(f"{flag} {name} is the released {released_model} checkpoint, which this generate.py does not "
                        f"sample: use {released_model.split('-')[0]}-SRA/generate.py")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its warning per retry would spread the one-line error over many lines
    try:
        return Path(hf_hub_download(RELEASED_REPO, name))
    except OSError as e:  # huggingface_hub's errors (offline, unreachable, HTTP) and the cache's are all OSErrors
        reason = error_reason(e)
        raise UserError(f"{flag} {name}: cannot download https://huggingface.co/{RELEASED_REPO}/resolve/main/{name} "
                        f"({reason}); download it by hand and pass {flag} PATH") from None
    finally:
        hub_logging.set_verbosity(verbosity)


def model_state_dict(checkpoint, key="ema"):
    """The weights to sample with: checkpoint[key] of a training checkpoint, or a bare state dict."""
    if isinstance(checkpoint, dict) and key in checkpoint:
        return checkpoint[key]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise UserError(f"checkpoint has no '{key}' entry and is not a state dict")


def load_weights(module, state_dict, source, hint):
    """load_state_dict(strict=True), with the differences named in one line when the shapes don't fit.

    source: where the weights came from (e.g. '--ckpt a.pt'); hint: the flags that decide the shapes.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)} expected" for k, v in expected.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shapes differ ({'; '.join(mismatched[:3])})")
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
    if problems:
        raise UserError(f"{source} is another architecture than {hint}: {'; '.join(problems)}")
    module.load_state_dict(state_dict, strict=True)


def with_own_head(module, state_dict):
    """state_dict with `module`'s own `ap_head.*` entries where it has none at all (the original DiT and SiT
    checkpoints): the head serves only the alignment loss, and neither sampling nor the PCA maps run it."""
    if any(k.startswith("ap_head.") for k in state_dict):
        return state_dict
    return {**{k: v for k, v in module.state_dict().items() if k.startswith("ap_head.")}, **state_dict}


def learns_sigma(state_dict):
    """True if the weights' final layer predicts 8 channels per latent pixel, 4 of them a variance: the original DiT
    and SiT checkpoints (learned sigma), not SiT-SRA's (4)."""
    patch = state_dict.get("x_embedder.proj.weight")
    final = state_dict.get("final_layer.linear.weight")
    return patch is not None and final is not None and final.shape[0] == patch.shape[-1] ** 2 * 8


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash mid-write leaves the previous file (or none), never a truncated one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is shared like any saved file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder, flag):
    """Creates `folder` and proves a file can be written there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder}: not writable ({e.strerror or e})") from None


def check_shared_folder(folder, flag, rank, all_gather, barrier):
    """UserError on every process unless every process sees the file that rank 0 writes in `folder` (created by rank
    0 beforehand). With several nodes, a folder on a node's own disk would otherwise show up later as a hang at a
    barrier, a resume from nothing, or PNGs the main process cannot read.

    all_gather(list) -> the concatenation of every process's list in rank order; barrier() waits for all."""
    token = all_gather([secrets.token_hex(8)] if rank == 0 else [])[0]
    marker = Path(folder) / f".shared-check-{token}"
    if rank == 0:
        marker.write_text(token)
    barrier()
    try:
        sees = marker.read_text() == token
    except OSError:
        sees = False
    views = all_gather([(sees, socket.gethostname())])
    if rank == 0:
        marker.unlink()
    blind = [f"{r} on {host}" for r, (sees, host) in enumerate(views) if not sees]
    if blind:
        raise UserError(f"{flag} {folder}: process {', '.join(blind)} cannot see the files process 0 on {views[0][1]} "
                        f"writes there; with several nodes, {flag} must be on a filesystem every node shares")


def compile_by_default(device):
    """--compile's default on `device` (a torch.device): on for CUDA, where the compiled step is
    faster once its kernels are built; off elsewhere (on a CPU it gained a few percent per step in
    benchmarks/README.md, for a first step that builds C++ kernels)."""
    return device.type == "cuda"


def compile_prerequisite_problem(device):
    """Why torch.compile's default backend (inductor) cannot build kernels for `device`, or None:
    on CUDA it needs Triton and a GPU Triton supports, on a CPU a working C++ compiler."""
    from torch._dynamo.device_interface import get_interface_for_device
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler
    from torch.utils._triton import has_triton_package

    if device.type == "cuda":
        if not has_triton_package():
            return "torch.compile needs Triton on CUDA and it is not installed"
        try:
            get_interface_for_device("cuda").raise_if_triton_unavailable(device)
        except (ImportError, RuntimeError) as e:
            return f"torch.compile cannot use Triton on {torch.cuda.get_device_name(device)}: {e}"
        return None
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as e:
        return f"torch.compile needs a C++ compiler on the CPU: {e}"
    return None


def load_vae(name, device):
    """A diffusers AutoencoderKL from 'ema' / 'mse' (stabilityai/sd-vae-ft-*), a hub name or a local folder."""
    from diffusers.models import AutoencoderKL

    name = VAE_SHORTHANDS.get(name, name)
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = error_reason(e)
        raise UserError(f"--vae {name}: cannot load a diffusers AutoencoderKL ({reason})") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_to_uint8(vae, latents):
    """Scaled latents (N, 4, h, w) -> uint8 images (N, 8h, 8w, 3) on the CPU."""
    images = vae.decode(latents.to(vae.dtype) / LATENT_SCALE).sample
    images = torch.clamp(255 * (images + 1) / 2, 0, 255)
    return images.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def save_image_grid(images, path, nrow=None):
    """uint8 images (N, H, W, 3) -> one PNG grid with nrow columns (default: a square)."""
    n, h, w, _ = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * h, nrow * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    Image.fromarray(grid).save(path)
