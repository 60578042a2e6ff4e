"""Trains DiT with Self-Representation Alignment on preprocessed ImageNet latents.

    cd DiT-SRA
    accelerate launch --config_file configs/default.yaml train.py \
        --model DiT-XL/2 --resolution 256 --batch-size 32 --mixed-precision fp16 \
        --block-out-s 8 --block-out-t 16 --t-max 0.2 --data-dir DATA --exp-name ditxl-sra

Writes output-dir/exp-name/{args.json, log.txt, losses.jsonl, checkpoints/}.
Resume exactly with `--resume-ckpt latest` (or a checkpoint path); SIGTERM/SIGINT save and exit.
"""
import argparse

from alignment import LOSS_TYPES
from diffusion import create_diffusion
from loss import SRALoss
from models import DiT_models
from training import Trainer, add_training_flags, build_model, fused_adamw, start_run
from utils import run_main

ALIGN_BASE_WEIGHT = 0.4  # DiT's alignment weight before its decay (alignment.align_weight)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_flags(p, DiT_models, "DiT-XL/2")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="TF32 matmuls on Ampere+ GPUs (default off, as the released DiT train.py)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="sml1")
    return p.parse_args(argv)


def main(args):
    accelerator, exp_dir = start_run(args)
    model = build_model(DiT_models, args)
    trainer = Trainer(args, accelerator, model, fused_adamw(model, args), exp_dir)
    loss_fn = SRALoss(create_diffusion(timestep_respacing=""), block_out_s=args.block_out_s,
                      block_out_t=args.block_out_t, t_max=args.t_max, loss_type=args.loss_type,
                      cfg_prob=args.cfg_prob, num_classes=args.num_classes,
                      teacher=None if args.no_sra else trainer.ema.model,
                      teacher_fp32=args.teacher_fp32)
    trainer.run(loss_fn, ALIGN_BASE_WEIGHT)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
