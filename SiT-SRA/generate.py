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
from pathlib import Path

import torch

from models import SiT_models
from samplers import euler_maruyama_sampler, euler_sampler
from sampling_io import (LATENT_CHANNELS, RowGenerators, add_common_flags, autocast_call, check_common_flags,
                         compile_call, prepare, read_checkpoint, run_on_processes, sample_folder_name, sample_seed,
                         write_samples)
from utils import UserError, decode_to_uint8, learns_sigma, run_main

PATH_TYPES = ("linear", "cosine")
# Flags that default to the training checkpoint's args, and failing those to the released generate.py's defaults.
# The guidance flags default to a released checkpoint's known settings (utils.RELEASED_CHECKPOINTS) when named.
RELEASED_DEFAULTS = {"model": "SiT-B/2", "resolution": 256, "num_classes": 1000, "path_type": "linear", "qk_norm": False,
                     "cfg_scale": 1.8, "guidance_high": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(p, SiT_models, RELEASED_DEFAULTS, "the integration stays float64")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of 8; default: the checkpoint's, else 256")
    p.add_argument("--mode", choices=["sde", "ode"], default="sde")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale (1: none); default: a released checkpoint's, else 1.8")
    p.add_argument("--path-type", choices=PATH_TYPES, default=None, help="default: the checkpoint's, else linear")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="Heun correction (--mode ode only)")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guide only when guidance-low <= t <= ...")
    p.add_argument("--guidance-high", type=float, default=None,
                   help="... <= guidance-high (t = 1 is noise); default: a released checkpoint's, else 1.0")
    p.add_argument("--class-balanced", action="store_true",
                   help="sample i shows class i %% num-classes (equal counts) instead of a random class")
    return p.parse_args(argv)


def check_flags(args):
    """Flag errors, once the checkpoint has filled the unset flags: raises UserError naming the flag."""
    if args.model not in SiT_models or args.path_type not in PATH_TYPES:
        remedy = "sample it with DiT-SRA/generate.py" if args.model.startswith("DiT-") else "pass --model and --path-type"
        raise UserError(f"--ckpt {args.ckpt} was trained with --model {args.model} --path-type {args.path_type}, "
                        f"which this generate.py does not have; {remedy}")
    check_common_flags(args)
    if args.num_steps < 1:
        raise UserError(f"--num-steps {args.num_steps} must be at least 1")
    if args.guidance_low > args.guidance_high:
        raise UserError(f"--guidance-low {args.guidance_low} is above --guidance-high {args.guidance_high}")
    if args.heun and args.mode != "ode":
        raise UserError("--heun applies to --mode ode only (the SDE sampler has no Heun correction)")


# ---------------------------------------------------------------------------------------------- setup

def folder_name(args):
    """sampling_io.sample_folder_name (which says how it differs from the released name) with the SDE/ODE mode, the
    steps, Heun, the guidance interval, the path and the precision, and `-balanced` with --class-balanced."""
    settings = (f"{args.mode}-steps-{args.num_steps}{'-heun' if args.heun else ''}-interval-{args.guidance_low}-"
                f"{args.guidance_high}-{args.path_type}-{args.precision}")
    return sample_folder_name(args, settings) + ("-balanced" if args.class_balanced else "")


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
                      null_class=args.num_classes, step_noise=rows.fill_normal if args.mode == "sde" else None)
    return decode_to_uint8(vae, samples.float())


# ---------------------------------------------------------------------------------------------- main

def generate(args, procs, weights):
    folder = Path(args.sample_dir) / folder_name(args)
    model, vae = prepare(args, procs, SiT_models, folder, weights)
    model_fn = compile_call(autocast_call(model, procs.device, args.precision), procs.device, args.compile)
    write_samples(args, procs, folder, lambda indices: sample_batch(args, model_fn, vae, indices, procs.device))


def refuse_original_sit(args, weights):
    """UserError for an original SiT checkpoint (SiT-XL-2-256x256.pt: learned sigma, no ap_head). It reads time the
    other way round (t = 1 is data) and was scored with SiT's own sampler (its SDE, guidance on 3 of 4 channels at
    every step), so this sampler is not the one its published FID was measured with."""
    if learns_sigma(weights.state_dict) and not any(k.startswith("ap_head.") for k in weights.state_dict):
        raise UserError(f"--ckpt {args.ckpt} is an original SiT checkpoint (learned sigma, t = 1 is data), which this "
                        "generate.py does not sample: sample it with SiT's own sample_ddp.py, and draw its PCA maps "
                        "with pca-vis/main_pca.py --baseline")


def main(args):
    weights = read_checkpoint(args, RELEASED_DEFAULTS, SiT_models)
    refuse_original_sit(args, weights)
    check_flags(args)
    run_on_processes(generate, args, weights)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
