"""Trains DiT with Self-Representation Alignment on preprocessed ImageNet latents.

    cd DiT-SRA
    accelerate launch --config_file configs/default.yaml train.py \
        --model DiT-XL/2 --resolution 256 --batch-size 32 --mixed-precision fp16 \
        --block-out-s 8 --block-out-t 16 --t-max 0.2 --data-dir DATA --exp-name ditxl-sra

Writes output-dir/exp-name/{args.json, log.txt, losses.jsonl, checkpoints/}.
Resume exactly with `--resume-ckpt latest` (or a checkpoint path); SIGTERM/SIGINT save and exit.
"""
import argparse
import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import LatentDataset
from diffusion import create_diffusion
from loss import LOSS_TYPES, SRALoss, align_weight
from models import DiT_models
from training import (EpochBatchSampler, StopRequest, compile_models, load_optimizer_state, resolve_resume, rng_state,
                      set_rng_state, train_step, write_checkpoint)
from utils import (UserError, check_writable, load_checkpoint, load_weights, non_negative_int, positive_int,
                   run_main)

ALIGN_BASE_WEIGHT = 0.4  # DiT's alignment weight before decay (SPEC section 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # logging and checkpoints
    p.add_argument("--output-dir", default="exps")
    p.add_argument("--exp-name", required=True)
    p.add_argument("--logging-dir", default="logs", help="tracker folder inside output-dir")
    p.add_argument("--report-to", default=None, help="tracker for accelerate, e.g. wandb")
    p.add_argument("--resume-ckpt", default=None, help="checkpoint path, or 'latest' of this experiment")
    p.add_argument("--checkpoint-steps", type=positive_int, default=50000)
    p.add_argument("--checkpoint-epochs", type=positive_int, default=200)
    p.add_argument("--keep-last", type=non_negative_int, default=0,
                   help="keep only the K newest step checkpoints (0: all)")
    p.add_argument("--log-every", type=positive_int, default=100,
                   help="steps between host syncs for logging and checks")
    p.add_argument("--max-train-steps", type=positive_int, default=4_100_000,
                   help="stop after this many steps or --epochs, whichever comes first")
    p.add_argument("--epochs", type=positive_int, default=801)
    # model
    p.add_argument("--model", choices=sorted(DiT_models), default="DiT-XL/2")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False)
    # data
    p.add_argument("--data-dir", "--data-dir-train", dest="data_dir", required=True,
                   help="folder holding vae-sd/ (preprocessing/dataset_tools.py encode)")
    p.add_argument("--resolution", type=int, default=256, help="image side in pixels (256, 512; small for tests)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    p.add_argument("--num-workers", type=non_negative_int, default=8)
    # precision and optimisation
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="fp16")
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--adam-weight-decay", type=float, default=0.0)
    p.add_argument("--adam-epsilon", type=float, default=1e-8)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="accepted for `python -m torch.distributed.launch`; accelerate reads LOCAL_RANK itself")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay per step; the EMA is the sampled model and the SRA teacher")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the student's forward and the teacher's features (slower start, faster steps)")
    p.add_argument("--skip-nonfinite", type=non_negative_int, default=0,
                   help="steps with a non-finite loss to skip before stopping")
    # loss
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="sml1")
    p.add_argument("--cfg-prob", type=float, default=0.1, help="class-dropout probability")
    p.add_argument("--block-out-s", type=int, default=4, help="student block whose features are aligned")
    p.add_argument("--block-out-t", type=int, default=8, help="EMA-teacher block giving the target features")
    p.add_argument("--t-max", type=float, default=0.2, help="largest time gap between student and teacher")
    p.add_argument("--no-sra", action="store_true", help="baseline: no alignment loss, no teacher forward")
    return p.parse_args(argv)


def main(args):
    # ---------------------------------------------------------------- setup
    # TF32 matmuls and convolutions on Ampere and newer GPUs, as the released train.py (no effect on CPUs)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=args.no_sra)
    exp_dir = Path(args.output_dir) / args.exp_name
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / args.logging_dir)),
        kwargs_handlers=[ddp_kwargs],
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise UserError(f"WORLD_SIZE={world_size} but accelerate runs {accelerator.num_processes} process(es): "
                        "on a machine without GPUs set ACCELERATE_USE_CPU=true")
    device, rank, is_main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    checkpoint_dir = exp_dir / "checkpoints"
    if is_main:
        for folder in (exp_dir, checkpoint_dir):
            check_writable(folder, "--output-dir")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(exp_dir / "log.txt")] if is_main
                        else [logging.NullHandler()])
    logger = logging.getLogger("train")
    set_seed(args.seed + rank)

    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not a multiple of 8 (the VAE's downsampling)")
    latent_size = args.resolution // 8
    try:
        model = DiT_models[args.model](input_size=latent_size, num_classes=args.num_classes,
                                       class_dropout_prob=args.cfg_prob, fused_attn=args.fused_attn,
                                       qk_norm=args.qk_norm)
    except ValueError as e:
        raise UserError(f"--model {args.model} --resolution {args.resolution}: {e}") from None
    if not args.no_sra:
        for flag, depth in (("--block-out-s", args.block_out_s), ("--block-out-t", args.block_out_t)):
            if not 1 <= depth <= model.depth:
                raise UserError(f"{flag} {depth} is outside 1..{model.depth}, the depth of {args.model}")
        if args.block_out_s >= args.block_out_t:
            raise UserError(f"--block-out-s {args.block_out_s} must be shallower than --block-out-t {args.block_out_t}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True)

    dataset = LatentDataset(args.data_dir, resolution=args.resolution, num_classes=args.num_classes)
    global_batch = args.batch_size * accelerator.num_processes
    if len(dataset) < global_batch * args.gradient_accumulation_steps:
        raise UserError(f"--data-dir {args.data_dir}: {len(dataset)} items, fewer than one global batch of "
                        f"{global_batch * args.gradient_accumulation_steps}")
    sampler = EpochBatchSampler(len(dataset), args.batch_size, rank, accelerator.num_processes, args.seed)
    # The loader's own generator keeps its worker seeds from drawing on the global RNG, which a
    # resumed run restores exactly.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
                        generator=torch.Generator())
    batches_per_epoch = len(dataset) // global_batch
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps

    # ---------------------------------------------------------------- resume
    steps, epoch, batch_in_epoch, nonfinite_skipped = 0, 0, 0, 0
    if args.resume_ckpt:
        path = resolve_resume(args.resume_ckpt, checkpoint_dir)
        ckpt = load_checkpoint(path, "--resume-ckpt")
        hint = f"--model {args.model} --resolution {args.resolution} --num-classes {args.num_classes}"
        load_weights(model, ckpt["model"], f"--resume-ckpt {path}", hint)
        load_optimizer_state(optimizer, ckpt["opt"], f"--resume-ckpt {path}")
        steps, epoch = ckpt["steps"], ckpt["epoch"]
        if "rng" not in ckpt:  # written by the released train.py: it continues that epoch from a new shuffle
            logger.info(f"{path} holds no RNG state or data position (a checkpoint of the released code): "
                        f"continuing at step {steps} from the start of epoch {epoch}, not bit-identical to an "
                        "uninterrupted run")
        batch_in_epoch, nonfinite_skipped = ckpt.get("batch_in_epoch", 0), ckpt.get("nonfinite_skipped", 0)
        if "rng" in ckpt and len(ckpt["rng"]) != accelerator.num_processes:
            raise UserError(f"--resume-ckpt {path} was written by {len(ckpt['rng'])} processes; resume with "
                            "the same number for an exact resume")
        logger.info(f"resumed from {path} at step {steps} (epoch {epoch}, batch {batch_in_epoch})")

    model, optimizer = accelerator.prepare(model, optimizer)
    if args.resume_ckpt and accelerator.scaler is not None and ckpt.get("scaler"):
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    raw_model = accelerator.unwrap_model(model)
    # The EMA teacher is copied after DDP broadcast rank 0's weights. Copied before, as in the
    # released code, each process's teacher would start from its own random initialisation.
    ema = copy.deepcopy(raw_model).eval().requires_grad_(False)
    if args.resume_ckpt:
        load_weights(ema, ckpt["ema"], f"--resume-ckpt {path}", hint)
    ema_params, model_params = list(ema.parameters()), list(raw_model.parameters())
    if args.compile:
        compile_models(raw_model, ema)
    teacher = None if args.no_sra else ema
    loss_fn = SRALoss(create_diffusion(timestep_respacing=""), block_out_s=args.block_out_s,
                      block_out_t=args.block_out_t, t_max=args.t_max, loss_type=args.loss_type,
                      cfg_prob=args.cfg_prob, num_classes=args.num_classes)

    if is_main:
        (exp_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        logger.info(f"{args.model}: {sum(p.numel() for p in model_params):,} parameters; {len(dataset):,} items; "
                    f"{steps_per_epoch} steps per epoch; {accelerator.num_processes} process(es)")
        accelerator.init_trackers("SRA", config=vars(args), init_kwargs={"wandb": {"name": args.exp_name}})
    loss_log = exp_dir / "losses.jsonl"
    if is_main:  # a resumed run rewrites the log from its checkpoint on: the log matches an uninterrupted run
        kept = [line for line in (loss_log.read_text().splitlines() if loss_log.exists() else [])
                if json.loads(line)["step"] <= steps]
        loss_log.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------- helpers of the loop
    pending = []  # per-step device tensors (denoising, align, grad norm), read at the next sync

    def flush_log():
        """The one host sync of the loop: writes the pending steps' losses, checks they are finite."""
        nonlocal nonfinite_skipped
        if not pending:
            return
        values = torch.stack([torch.stack(v) for _, _, v in pending]).float()
        values = accelerator.reduce(values.to(device), reduction="mean").cpu().tolist()
        records = [{"step": s, "epoch": e, "loss": d, "align_loss": a, "grad_norm": g}
                   for (s, e, _), (d, a, g) in zip(pending, values)]
        pending.clear()
        bad = [r for r in records if not np.isfinite([r["loss"], r["align_loss"]]).all()]
        nonfinite_skipped += len(bad)
        if is_main:
            with loss_log.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            last = records[-1]
            progress.set_postfix(gen_loss=f"{last['loss']:.4f}", align_loss=f"{last['align_loss']:.4f}")
            accelerator.log({k: last[k] for k in ("loss", "align_loss", "grad_norm")}, step=last["step"])
        if bad and nonfinite_skipped > args.skip_nonfinite:
            r = bad[0]
            raise UserError(f"non-finite loss at step {r['step']}: denoising loss {r['loss']}, alignment loss "
                            f"{r['align_loss']} (the step was not applied; allow skipping with --skip-nonfinite)")
        if bad:
            logger.info(f"skipped {len(bad)} non-finite step(s) at {[r['step'] for r in bad]}")

    def save_checkpoint(name, keep_last=0):
        flush_log()
        rngs = gather_object([rng_state()])
        if is_main:
            ckpt = {"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                    "args": args, "epoch": epoch, "steps": steps, "batch_in_epoch": batch_in_epoch,
                    "nonfinite_skipped": nonfinite_skipped, "rng": rngs,
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
            write_checkpoint(ckpt, checkpoint_dir, name, keep_last)
            logger.info(f"saved checkpoint {checkpoint_dir / name}")
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- training loop
    if args.resume_ckpt and "rng" in ckpt:  # restored last, so that nothing above shifts the training draws
        set_rng_state(ckpt["rng"][rank])
    stop = StopRequest()
    max_steps = min(args.max_train_steps, args.epochs * steps_per_epoch)  # the last step is always saved
    progress = tqdm(total=max_steps, initial=steps, desc="steps", disable=not is_main)
    finished = steps >= max_steps
    while not finished and epoch < args.epochs:
        sampler.set_epoch(epoch, batch_in_epoch)
        align_w = 0.0 if args.no_sra else align_weight(args.loss_type, epoch, args.resolution, ALIGN_BASE_WEIGHT)
        for moments, labels in loader:
            moments = moments.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            losses = train_step(accelerator, model, optimizer, loss_fn, teacher, moments, labels, align_w,
                                args.max_grad_norm, ema_params, model_params, ema_decay=args.ema_decay)
            batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            steps += 1
            progress.update(1)
            pending.append((steps, epoch, losses))
            finished = steps >= max_steps
            if steps % args.log_every == 0 or finished:
                flush_log()
            stopping = stop.agreed(accelerator, at_sync_point=steps % args.log_every == 0)
            if finished or stopping or steps % args.checkpoint_steps == 0:
                save_checkpoint(f"step-{steps}.pt", args.keep_last)
            if stopping:
                logger.info(f"stopped by a signal at step {steps}; resume with --resume-ckpt latest "
                            f"--exp-name {args.exp_name} --output-dir {args.output_dir}")
                return
            if finished:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
            if epoch % args.checkpoint_epochs == 0:
                save_checkpoint(f"epoch-{epoch}.pt")
    flush_log()
    progress.close()
    accelerator.end_training()
    logger.info(f"done: {steps} steps, checkpoints in {checkpoint_dir}")


if __name__ == "__main__":
    run_main(lambda: main(parse_args()))
