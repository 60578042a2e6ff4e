"""Samples images from a trained DiT(-SRA) checkpoint for FID: one PNG per sample, then one .npz for the ADM suite.

    cd DiT-SRA
    torchrun --nproc_per_node N generate.py --ckpt CKPT --sample-dir SAMPLE_DIR \
        --model DiT-XL/2 --resolution 256 --num-sampling-steps 250 --cfg-scale 1.0

`python generate.py ...` runs one process; torchrun with N processes uses NCCL on GPUs and gloo on CPUs.
Writes SAMPLE_DIR/<folder>/{i:06d}.png and SAMPLE_DIR/<folder>.npz (arr_0: uint8 (N, H, W, 3), index order),
<folder> naming the settings (see `folder_name`).

Sampling: respaced DDPM (`create_diffusion("250")`), ancestral steps from Gaussian noise without
clipping; with --cfg-scale > 1 the batch is [z; z] with labels [y; null] and the model's `forward_with_cfg`.
`--sampler ddim` runs deterministic DDIM (eta 0) on the same number of evenly strided steps instead.

Determinism: sample i depends only on (--global-seed, i), whatever the number of processes and the batch: its CPU
generator (seed global_seed * 1_000_000 + i) gives, in this order, the initial latent (4, h, w), the label and then
every DDPM step's noise (see sampling_io.py). Resume: rerun the same command; valid PNGs are kept, the others are
generated again, and the .npz is written once all N PNGs are valid.
"""
import argparse
from pathlib import Path

import torch

from diffusion import create_diffusion
from models import DiT_models
from sampling_io import (LATENT_CHANNELS, RowGenerators, add_common_flags, autocast_call, check_common_flags,
                         compile_call, prepare, read_checkpoint, run_on_processes, sample_folder_name, sample_seed,
                         write_samples)
from utils import UserError, decode_to_uint8, run_main

# Flags that default to the training checkpoint's args, and failing those to the released generate.py's defaults.
RELEASED_DEFAULTS = {"model": "DiT-XL/2", "resolution": 256, "num_classes": 1000, "qk_norm": False}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(p, DiT_models, RELEASED_DEFAULTS, "the diffusion steps stay float32")
    p.add_argument("--resolution", "--image-size", type=int, default=None,
                   help="image side in pixels, a multiple of 8 (--image-size: the released name); default: the "
                        "checkpoint's, else 256")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="ddpm: ancestral steps (the released sampler); ddim: deterministic DDIM, eta 0")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (1: none)")
    p.add_argument("--num-sampling-steps", "--num-steps", type=int, default=250,
                   help="respaced steps out of the 1000 trained ones")
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted as the released generate.py does, without effect: DDPM and DDIM take no Heun step")
    return p.parse_args(argv)


def build_diffusion(args):
    """The respaced diffusion of --sampler / --num-sampling-steps; UserError if the steps cannot be spaced."""
    if args.num_sampling_steps < 1:
        raise UserError(f"--num-sampling-steps {args.num_sampling_steps} must be at least 1")
    spacing = f"ddim{args.num_sampling_steps}" if args.sampler == "ddim" else str(args.num_sampling_steps)
    try:
        return create_diffusion(spacing)
    except ValueError as e:
        raise UserError(f"--num-sampling-steps {args.num_sampling_steps} (--sampler {args.sampler}): {e}") from None


def check_flags(args):
    """Flag errors, once the checkpoint has filled the unset flags: raises UserError naming the flag."""
    if args.model not in DiT_models:
        remedy = "sample it with SiT-SRA/generate.py" if args.model.startswith("SiT-") else "pass --model"
        raise UserError(f"--ckpt {args.ckpt} was trained with --model {args.model}, which this generate.py does not "
                        f"have; {remedy}")
    check_common_flags(args)
    build_diffusion(args)


def folder_name(args):
    """sampling_io.sample_folder_name (which says how it differs from the released name) with the sampler, its steps
    and the precision."""
    return sample_folder_name(args, f"{args.sampler}-steps-{args.num_sampling_steps}-{args.precision}")


# ---------------------------------------------------------------------------------------------- sampling

def plain_loop(loop, model_fn, latents, labels, step_noise):
    """loop (a diffusion's p_sample_loop or ddim_sample_loop) from `latents` (n, 4, h, w) with labels (n,),
    the model called as model_fn(x, t, y=labels). Returns x_0 (n, 4, h, w)."""
    return loop(model_fn, latents.shape, noise=latents, clip_denoised=False, model_kwargs=dict(y=labels),
                progress=False, device=latents.device, step_noise=step_noise)


def guided_loop(loop, cfg_fn, latents, labels, null_class, cfg_scale, step_noise):
    """As plain_loop, with classifier-free guidance: the 2n rows [z; z] with labels [y; null] go through
    cfg_fn(x, t, y=..., cfg_scale=...) (the model's forward_with_cfg), and the first (guided) half is returned."""
    n = len(latents)

    def both_halves(noise):
        # Only the first half's noise is drawn (n rows, from the samples' own generators, as without guidance): the
        # second half's x is ignored by forward_with_cfg, which runs both halves on the first, so it needs none.
        noise[n:].copy_(step_noise(noise[:n]))
        return noise

    y = torch.cat([labels, torch.full_like(labels, null_class)])
    out = loop(cfg_fn, (2 * n, *latents.shape[1:]), noise=torch.cat([latents, latents]), clip_denoised=False,
               model_kwargs=dict(y=y, cfg_scale=cfg_scale), progress=False, device=latents.device,
               step_noise=both_halves)
    return out[:n]


def model_call(args, model, device):
    """The network call of sample_batch: forward_with_cfg with --cfg-scale > 1, else the forward, under --precision
    and compiled as --compile says (sampling_io.compile_call)."""
    forward = model.forward_with_cfg if args.cfg_scale > 1 else model
    return compile_call(autocast_call(forward, device, args.precision), device, args.compile)


def sample_batch(args, diffusion, model_fn, vae, indices, device):
    """uint8 images (len(indices), H, W, 3) of the given sample indices; model_fn is model_call's."""
    rows = RowGenerators([sample_seed(args.global_seed, i) for i in indices], device)
    latent_size = args.resolution // 8
    latents = rows.randn((LATENT_CHANNELS, latent_size, latent_size))  # drawn first, then the labels
    labels = rows.randint(args.num_classes)
    if args.sampler == "ddpm":
        loop, step_noise = diffusion.p_sample_loop, rows.fill_normal
    else:  # DDIM with eta 0 multiplies its step noise by 0: none is drawn
        loop, step_noise = diffusion.ddim_sample_loop, torch.Tensor.zero_
    if args.cfg_scale > 1:
        samples = guided_loop(loop, model_fn, latents, labels, args.num_classes, args.cfg_scale, step_noise)
    else:
        samples = plain_loop(loop, model_fn, latents, labels, step_noise)
    return decode_to_uint8(vae, samples.float())


# ---------------------------------------------------------------------------------------------- main

def generate(args, procs, weights):
    folder = Path(args.sample_dir) / folder_name(args)
    model, vae = prepare(args, procs, DiT_models, folder, weights)
    diffusion = build_diffusion(args)
    model_fn = model_call(args, model, procs.device)
    write_samples(args, procs, folder,
                  lambda indices: sample_batch(args, diffusion, model_fn, vae, indices, procs.device))


def main(args):
    weights = read_checkpoint(args, RELEASED_DEFAULTS, DiT_models)
    check_flags(args)
    run_on_processes(generate, args, weights)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
