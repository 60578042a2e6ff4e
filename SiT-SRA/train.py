"""Trains SiT with Self-Representation Alignment on preprocessed ImageNet latents.

    cd SiT-SRA
    accelerate launch --config_file configs/default.yaml train.py \
        --model SiT-XL/2 --resolution 256 --batch-size 32 --mixed-precision fp16 \
        --block-out-s 8 --block-out-t 20 --t-max 0.2 --data-dir DATA --exp-name sitxl-sra

Writes output-dir/exp-name/{args.json, log.txt, losses.jsonl, checkpoints/, samples/}.
Resume exactly with `--resume-ckpt latest` (or a checkpoint path); SIGTERM/SIGINT save and exit.
"""
import argparse

import numpy as np
import torch
from accelerate.utils import gather_object

from alignment import LOSS_TYPES
from loss import SRALoss
from models import SiT_models
from samplers import euler_sampler
from training import Trainer, add_training_flags, build_model, fused_adamw, start_run
from utils import decode_to_uint8, load_vae, non_negative_int, run_main, save_image_grid

ALIGN_BASE_WEIGHT = 2.0  # SiT's alignment weight before its decay (alignment.align_weight)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_flags(p, SiT_models, "SiT-XL/2")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (default on, as the released SiT train.py)")
    p.add_argument("--sample-steps", type=non_negative_int, default=100_000,
                   help="sample a 64-image grid every N steps (0: never)")
    p.add_argument("--vae", default="ema", help="ema | mse | hub name | local folder (for sample grids)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="cos",
                   help="cos (released default, constant weight 0.5) or sml1 (the paper's table, decayed weight)")
    p.add_argument("--path-type", choices=["linear", "cosine"], default="linear")
    p.add_argument("--prediction", choices=["v"], default="v")
    p.add_argument("--weighting", choices=["uniform", "lognormal"], default="uniform")
    return p.parse_args(argv)


class SampleGrid:
    """Every --sample-steps, 64 images of the EMA model (50 Euler steps, CFG 4 when labels were
    dropped) as samples/step-N.png. The noise and labels have their own generator, so sampling
    never shifts training's draws; each process samples its slice of the 64."""

    def __init__(self, args, accelerator, ema_model, sample_dir):
        self.args, self.accelerator, self.ema_model, self.sample_dir = args, accelerator, ema_model, sample_dir
        self.vae = load_vae(args.vae, accelerator.device)
        gen = torch.Generator().manual_seed(args.seed)
        latent_size, processes = args.resolution // 8, accelerator.num_processes
        self.noise = torch.randn(64, 4, latent_size, latent_size, generator=gen).chunk(processes)
        self.labels = torch.randint(0, args.num_classes, (64,), generator=gen).chunk(processes)

    @torch.no_grad()
    def __call__(self, steps):
        if steps % self.args.sample_steps:
            return
        args, accelerator, rank = self.args, self.accelerator, self.accelerator.process_index
        with accelerator.autocast():
            latents = euler_sampler(self.ema_model, self.noise[rank].to(accelerator.device),
                                    self.labels[rank].to(accelerator.device), num_steps=50,
                                    cfg_scale=4.0 if args.cfg_prob > 0 else 1.0, path_type=args.path_type,
                                    null_class=args.num_classes)
        images = gather_object([decode_to_uint8(self.vae, latents.float())])
        if accelerator.is_main_process:
            save_image_grid(np.concatenate(images), self.sample_dir / f"step-{steps}.png")


def main(args):
    accelerator, exp_dir = start_run(args, folders=("checkpoints", "samples"))
    model = build_model(SiT_models, args)
    trainer = Trainer(args, accelerator, model, fused_adamw(model, args), exp_dir)
    loss_fn = SRALoss(prediction=args.prediction, path_type=args.path_type, weighting=args.weighting,
                      block_out_s=args.block_out_s, block_out_t=args.block_out_t, t_max=args.t_max,
                      loss_type=args.loss_type, cfg_prob=args.cfg_prob, num_classes=args.num_classes,
                      teacher=None if args.no_sra else trainer.ema.model,
                      teacher_fp32=args.teacher_fp32)
    grid = SampleGrid(args, accelerator, trainer.ema.model, exp_dir / "samples") if args.sample_steps > 0 else None
    trainer.run(loss_fn, ALIGN_BASE_WEIGHT, after_step=grid)


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
