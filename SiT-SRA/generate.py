"""Samples images from a trained SiT(-SRA) checkpoint for FID: one PNG per sample, then one .npz for the ADM suite.

    cd SiT-SRA
    torchrun --nproc_per_node N generate.py --ckpt CKPT --sample-dir SAMPLE_DIR \
        --model SiT-XL/2 --resolution 256 --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7

`python generate.py ...` runs one process; torchrun with N processes uses NCCL on GPUs and gloo on CPUs.
Writes SAMPLE_DIR/<folder>/{i:06d}.png and SAMPLE_DIR/<folder>.npz (arr_0: uint8 (N, H, W, 3), index order),
<folder> naming the settings (see `folder_name`).

Determinism: sample i depends only on (--global-seed, i), whatever the number of processes and the batch: its CPU
generator (seed global_seed * 1_000_000 + i) gives, in this order, the initial latent (4, h, w), the label (replaced by
i % num_classes with --class-balanced) and then every SDE step's noise (see sampling_io.py). Resume: rerun the same command; valid PNGs are kept, the others are
generated again, and the .npz is written once all N PNGs are valid.
"""
import argparse
import re
from pathlib import Path

import torch

from models import SiT_models
from samplers import euler_maruyama_sampler, euler_sampler
from sampling_io import (LATENT_CHANNELS, PRECISIONS, RowGenerators, autocast_call, check_common_flags, prepare,
                         read_checkpoint, run_on_processes, sample_seed, write_samples)
from utils import UserError, decode_to_uint8, run_main

PATH_TYPES = ("linear", "cosine")
# Flags that default to the training checkpoint's args, and failing those to the released generate.py's defaults.
RELEASED_DEFAULTS = {"model": "SiT-B/2", "resolution": 256, "num_classes": 1000, "path_type": "linear"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="training checkpoint (its 'ema' weights) or a bare state dict")
    p.add_argument("--sample-dir", default="samples", help="parent folder of the PNG folder and the .npz")
    p.add_argument("--model", choices=sorted(SiT_models), default=None, help="default: the checkpoint's, else SiT-B/2")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of 8; default: the checkpoint's, else 256")
    p.add_argument("--vae", default="ema", help="ema | mse | hub name | local folder of a diffusers AutoencoderKL")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--mode", choices=["sde", "ode"], default="sde")
    p.add_argument("--cfg-scale", type=float, default=1.8, help="classifier-free guidance scale (1: none)")
    p.add_argument("--path-type", choices=PATH_TYPES, default=None, help="default: the checkpoint's, else linear")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action="store_true", help="Heun correction (--mode ode only)")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guide only when guidance-low <= t <= ...")
    p.add_argument("--guidance-high", type=float, default=1.0, help="... <= guidance-high (t = 1 is noise)")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--class-balanced", action="store_true",
                   help="sample i shows class i %% num-classes (equal counts) instead of a random class")
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (faster, slightly less exact)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="autocast dtype of the model calls; the integration stays float64")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="set by `python -m torch.distributed.launch`; LOCAL_RANK in the environment wins")
    return p.parse_args(argv)


def check_flags(args):
    """Flag errors, once the checkpoint has filled the unset flags: raises UserError naming the flag."""
    if args.model not in SiT_models or args.path_type not in PATH_TYPES:
        raise UserError(f"--ckpt {args.ckpt} was trained with --model {args.model} --path-type {args.path_type}, "
                        "which this generate.py does not have; pass --model and --path-type")
    check_common_flags(args)
    if args.num_steps < 1:
        raise UserError(f"--num-steps {args.num_steps} must be at least 1")
    if args.guidance_low > args.guidance_high:
        raise UserError(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}")
    if args.heun and args.mode != "ode":
        raise UserError("--heun applies to --mode ode only (the SDE sampler has no Heun correction)")


# ---------------------------------------------------------------------------------------------- setup

def folder_name(args):
    """The released name, `{model}-{ckpt stem}-size-{res}-vae-{vae}-cfg-{cfg}-seed-{seed}-{mode}`, followed by every
    other setting that changes the pixels, so that a resume never mixes samples of different settings (switches that
    change only the rounding, --tf32, --fused-attn and the batch size, are left out, as in the released name)."""
    def clean(text):
        return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")

    vae = clean(Path(args.vae.rstrip("/")).name)  # a local folder or hub name shortened to its last part
    name = (f"{clean(args.model)}-{clean(Path(args.ckpt).stem)}-size-{args.resolution}-vae-{vae}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{args.mode}-steps-{args.num_steps}"
            f"{'-heun' if args.heun else ''}-interval-{args.guidance_low}-{args.guidance_high}-"
            f"{args.path_type}-{args.precision}")
    if args.num_classes != 1000:
        name += f"-classes-{args.num_classes}"
    if args.class_balanced:
        name += "-balanced"
    return name


# ---------------------------------------------------------------------------------------------- sampling

def sample_batch(args, model_fn, vae, indices, device):
    """uint8 images (len(indices), H, W, 3) of the given sample indices."""
    rows = RowGenerators([sample_seed(args.global_seed, i) for i in indices], device)
    latent_size = args.resolution // 8
    latents = rows.randn((LATENT_CHANNELS, latent_size, latent_size))  # drawn first, then the labels
    labels = rows.randint(args.num_classes)  # drawn even when replaced: the step noise stays that of the seed
    if args.class_balanced:
        labels = torch.tensor([i % args.num_classes for i in indices], device=labels.device)
    sampler = euler_maruyama_sampler if args.mode == "sde" else euler_sampler
    samples = sampler(model_fn, latents, labels, num_steps=args.num_steps, heun=args.heun, cfg_scale=args.cfg_scale,
                      guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=args.path_type,
                      null_class=args.num_classes, step_noise=rows.randn_like if args.mode == "sde" else None)
    return decode_to_uint8(vae, samples.float())


# ---------------------------------------------------------------------------------------------- main

def generate(args, procs, weights):
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    folder = Path(args.sample_dir) / folder_name(args)
    model, vae = prepare(args, procs, SiT_models, folder, weights)
    model_fn = autocast_call(model, procs.device, args.precision)
    write_samples(args, procs, folder, lambda indices: sample_batch(args, model_fn, vae, indices, procs.device))


def main(args):
    weights = read_checkpoint(args, RELEASED_DEFAULTS)
    check_flags(args)
    run_on_processes(generate, args, weights)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
