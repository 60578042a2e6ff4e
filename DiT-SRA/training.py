"""The training loop both train.py share, and its pieces: the flags, the run's setup, the resumable
batch order, one optimisation step with its EMA update, the loss log, pre-emption signals and resume
(the checkpoint files themselves: checkpoints.py). What a checkpoint holds and the order of the random
draws, on which an exact resume depends, are written down in docs/training.md.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import argparse
import copy
import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from alignment import align_weight
from checkpoints import load_optimizer_state, resolve_resume, rng_state, set_rng_state, write_checkpoint
from dataset import LatentDataset, sample_posterior
from utils import (UserError, check_shared_folder, check_writable, compile_by_default, compile_prerequisite_problem,
                   error_reason, load_checkpoint, load_weights, non_negative_int, positive_int)

EMA_DECAY = 0.9999


class EpochBatchSampler(Sampler):
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), cut into global
    batches (the last partial one dropped), of which this process takes its slice. With gradient
    accumulation, an epoch holds whole optimizer steps of `accumulation` batches (the batches left
    over are dropped too), so a step never mixes two epochs. `set_epoch` can start inside an epoch,
    which is how a resumed run continues at the exact batch."""

    def __init__(self, num_items, batch_size, rank, world_size, seed, accumulation=1):
        self.num_items, self.batch_size, self.rank, self.world_size, self.seed = (
            num_items, batch_size, rank, world_size, seed)
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_items // self.global_batch // accumulation * accumulation
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


class EMA:
    """The exponential moving average of a model's parameters: the sampled model and SRA's teacher.

    Copy it after `accelerator.prepare`, so that under DDP every process copies rank 0's broadcast
    weights (copied before, each process's teacher would start from its own initialisation).
    """

    def __init__(self, model, decay=EMA_DECAY):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.params, self.source_params = list(self.model.parameters()), list(model.parameters())

    @torch.no_grad()
    def update(self):
        """ema = decay * ema + (1 - decay) * param, for all parameters at once, as ema += (1 - decay)
        (param - ema): one pass over the EMA instead of a multiply pass and an add pass."""
        torch._foreach_lerp_(self.params, self.source_params, 1 - self.decay)


def clip_inside_fused_adamw(optimizer, parameters, max_grad_norm):
    """Gradient clipping as torch's clip_grad_norm_ (g * min(1, max_norm / (norm + 1e-6))) done by
    the fused AdamW kernel, which divides each gradient by `grad_scale` as it reads it: one pass
    over the gradients (the norm) instead of two. A non-finite norm sets `found_inf`, on which the
    kernel skips the update. Returns the gradient norm (0-dim tensor on the device)."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    optimizer.grad_scale = torch.clamp((grad_norm + 1e-6) / max_grad_norm, min=1.0)
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
    return grad_norm


def loss_backward(accelerator, model, loss_fn, x0, labels, align_w):
    """Forward under autocast and backward of denoising + align_w * alignment; returns both losses
    as 0-dim device tensors (detached, not read: no sync)."""
    with accelerator.autocast():
        denoising, align = loss_fn(model, x0, labels)
        loss = denoising.mean() + align_w * align.mean()
    accelerator.backward(loss)
    return denoising.detach().mean(), align.detach().mean()


def optimizer_step(accelerator, model, optimizer, max_grad_norm):
    """Clips (inside the fused AdamW, `clip_inside_fused_adamw`) and steps when the gradients are
    synchronised; returns the gradient norm (0-dim device tensor), None on a micro-batch that only
    accumulates (the prepared optimizer skips its step there)."""
    grad_norm = None
    if accelerator.sync_gradients:
        if accelerator.scaler is None:
            grad_norm = clip_inside_fused_adamw(optimizer.optimizer, model.parameters(), max_grad_norm)
        else:  # fp16: the GradScaler unscales first and sets grad_scale and found_inf itself
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm).detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_step(accelerator, model, optimizer, loss_fn, ema, moments, labels, align_w, max_grad_norm):
    """One micro-batch of SRA training as train.py runs it, without a host-device sync.

    accelerator, model, optimizer: prepared by `accelerator`; the optimizer is a fused AdamW.
    loss_fn: the tree's SRALoss, which holds its teacher (the EMA model, or None for no SRA).
    ema: an `EMA` of the unwrapped model; it moves after every optimizer step (not after a
        micro-batch that only accumulates).
    moments: (N, 8, h, w) posterior mean and std on the device; labels: (N,) long class ids.
    align_w: the alignment weight of this epoch; max_grad_norm: the clipping threshold.
    Returns (denoising loss, alignment loss, gradient norm) as 0-dim device tensors; the gradient
    norm is None on a micro-batch that only accumulates.
    """
    with accelerator.accumulate(model):
        x0 = sample_posterior(moments)
        denoising, align = loss_backward(accelerator, model, loss_fn, x0, labels, align_w)
        grad_norm = optimizer_step(accelerator, model, optimizer, max_grad_norm)
    if accelerator.sync_gradients:
        ema.update()
    return denoising, align, grad_norm


def resolve_compile(args, device):
    """Sets args.compile (None: `compile_by_default`) and returns it; raises UserError naming
    --no-compile when torch.compile cannot work on `device`, rather than running eagerly."""
    if args.compile is None:
        args.compile = compile_by_default(device)
    if args.compile:
        problem = compile_prerequisite_problem(device)
        if problem:
            raise UserError(f"--compile: {problem}; train without compiling with --no-compile")
    return args.compile


def compile_models(model, ema):
    """torch.compile, in place, the student's forward and the EMA teacher's `features`.

    In place rather than wrapped, so parameter names keep no `_orig_mod.` prefix: checkpoints stay
    plain state dicts and load with or without compilation. Call after the EMA is copied from the model.
    """
    model.compile()
    ema.features = torch.compile(ema.features)


class StopRequest:
    """Remembers SIGTERM / SIGINT so the loop can finish its step, checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.requested = True

    def agreed(self, accelerator, at_sync_point):
        """One process stops at once; several agree at sync points, so all stop at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        if not at_sync_point:
            return False
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


def add_training_flags(p, models, default_model):
    """Adds the flags both train.py have to the ArgumentParser `p`: logging and checkpoints, --model (choices: the
    registry `models`) and its switches, data, precision and optimisation, and the SRA flags every loss takes; each
    train.py adds its loss type and its own flags."""
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
    p.add_argument("--model", choices=sorted(models), default=default_model)
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
    p.add_argument("--ema-decay", type=float, default=EMA_DECAY,
                   help="EMA decay per step; the EMA is the sampled model and the SRA teacher")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the student's forward and the teacher's features (slower first step, faster "
                        "steps); default: on when the device is CUDA")
    p.add_argument("--skip-nonfinite", type=non_negative_int, default=0,
                   help="steps with a non-finite loss to skip before stopping")
    # SRA
    p.add_argument("--cfg-prob", type=float, default=0.1, help="class-dropout probability")
    p.add_argument("--block-out-s", type=int, default=4, help="student block whose features are aligned")
    p.add_argument("--block-out-t", type=int, default=8, help="EMA-teacher block giving the target features")
    p.add_argument("--t-max", type=float, default=0.2, help="largest time gap between student and teacher")
    p.add_argument("--no-sra", action="store_true", help="baseline: no alignment loss, no teacher forward")
    p.add_argument("--teacher-fp32", action="store_true",
                   help="run the EMA teacher in float32 outside autocast, as the released code (slower with "
                        "--mixed-precision; default: under the student's autocast)")


def start_run(args, folders=("checkpoints",)):
    """TF32 (--tf32), the accelerator, writable experiment folders, log file and seed of a run.

    Returns (accelerator, exp_dir); `folders` are created inside output-dir/exp-name.
    """
    # TF32 matmuls on Ampere and newer GPUs as --tf32 says (no effect on CPUs). cuDNN's convolutions keep PyTorch's
    # default, TF32 on, as in both released train.py (SiT's sets it, DiT's leaves the default).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    exp_dir = Path(args.output_dir) / args.exp_name
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(exp_dir), logging_dir=str(exp_dir / args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.no_sra)],
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise UserError(f"WORLD_SIZE={world_size} but accelerate runs {accelerator.num_processes} process(es): "
                        "on a machine without GPUs set ACCELERATE_USE_CPU=true")
    is_main = accelerator.is_main_process
    if is_main:
        for folder in (exp_dir, *(exp_dir / name for name in folders)):
            check_writable(folder, "--output-dir")
    if accelerator.num_processes > 1:
        check_shared_folder(exp_dir, "--output-dir", accelerator.process_index, gather_object,
                            accelerator.wait_for_everyone)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(exp_dir / "log.txt")] if is_main
                        else [logging.NullHandler()])
    set_seed(args.seed + accelerator.process_index)
    return accelerator, exp_dir


def build_model(models, args):
    """The model of --model for --resolution from the tree's registry, with the --block-out-s/-t
    depths checked against it (unless --no-sra)."""
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not a multiple of 8 (the VAE's downsampling)")
    try:
        model = models[args.model](input_size=args.resolution // 8, num_classes=args.num_classes,
                                   class_dropout_prob=args.cfg_prob, fused_attn=args.fused_attn, qk_norm=args.qk_norm)
    except ValueError as e:
        raise UserError(f"--model {args.model} --resolution {args.resolution}: {e}") from None
    if not args.no_sra:
        for flag, depth in (("--block-out-s", args.block_out_s), ("--block-out-t", args.block_out_t)):
            if not 1 <= depth <= model.depth:
                raise UserError(f"{flag} {depth} is outside 1..{model.depth}, the depth of {args.model}")
        if args.block_out_s >= args.block_out_t:
            raise UserError(f"--block-out-s {args.block_out_s} must be shallower than --block-out-t {args.block_out_t}")
    return model


def fused_adamw(model, args):
    """AdamW of the --learning-rate, --adam-* flags with the fused kernel (which also clips, see
    `clip_inside_fused_adamw`)."""
    return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=True)


class LossLog:
    """Per-step losses kept on the device and written to losses.jsonl at each `flush`, the one host
    sync of the loop. Counts non-finite steps (their update was skipped by the optimizer) and stops
    the run once there are more than --skip-nonfinite."""

    def __init__(self, accelerator, path, skip_nonfinite):
        self.accelerator, self.path, self.skip_nonfinite = accelerator, path, skip_nonfinite
        self.nonfinite_skipped = 0  # a resumed run continues the checkpoint's count (Trainer.resume)
        self.pending = []  # (step, epoch, (denoising, align, grad norm) device tensors)
        self.progress = None  # the tqdm bar that shows the latest losses

    def truncate(self, steps):
        """Drops the lines after `steps`, so that a resumed run's log matches an uninterrupted one."""
        if self.accelerator.is_main_process:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            kept = [line for line in lines if json.loads(line)["step"] <= steps]
            self.path.write_text("".join(line + "\n" for line in kept))

    def append(self, step, epoch, losses):
        self.pending.append((step, epoch, losses))

    def flush(self):
        """Averages the pending steps over processes, writes them, and checks they are finite."""
        if not self.pending:
            return
        values = torch.stack([torch.stack(v) for _, _, v in self.pending]).float()
        values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean").cpu().tolist()
        records = [{"step": s, "epoch": e, "loss": d, "align_loss": a, "grad_norm": g}
                   for (s, e, _), (d, a, g) in zip(self.pending, values)]
        self.pending.clear()
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            last = records[-1]
            self.progress.set_postfix(gen_loss=f"{last['loss']:.4f}", align_loss=f"{last['align_loss']:.4f}")
            self.accelerator.log({k: last[k] for k in ("loss", "align_loss", "grad_norm")}, step=last["step"])
        bad = [r for r in records if not np.isfinite([r["loss"], r["align_loss"]]).all()]
        self.nonfinite_skipped += len(bad)
        if bad and self.nonfinite_skipped > self.skip_nonfinite:
            r = bad[0]
            raise UserError(f"non-finite loss at step {r['step']}: denoising loss {r['loss']}, alignment loss "
                            f"{r['align_loss']} (the step was not applied; allow skipping with --skip-nonfinite)")
        if bad:
            logging.getLogger("train").info(f"skipped {len(bad)} non-finite step(s) at {[r['step'] for r in bad]}")


def latent_loader(args, accelerator):
    """The --data-dir latents in this process's resumable batch order: (loader, sampler, items)."""
    dataset = LatentDataset(args.data_dir, resolution=args.resolution, num_classes=args.num_classes)
    global_batch = args.batch_size * accelerator.num_processes
    if len(dataset) < global_batch * args.gradient_accumulation_steps:
        raise UserError(f"--data-dir {args.data_dir}: {len(dataset)} items, fewer than one global batch of "
                        f"{global_batch * args.gradient_accumulation_steps}")
    sampler = EpochBatchSampler(len(dataset), args.batch_size, accelerator.process_index, accelerator.num_processes,
                                args.seed, args.gradient_accumulation_steps)
    # The loader's own generator keeps its worker seeds from drawing on the global RNG, which a
    # resumed run restores exactly.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        pin_memory=torch.cuda.is_available(), persistent_workers=args.num_workers > 0,
                        generator=torch.Generator())
    return loader, sampler, len(dataset)


class Trainer:
    """The loop of train.py: data order, resume, the EMA, the steps, the loss log and checkpoints.

    Built from the tree's model and optimizer (not yet prepared); it restores a --resume-ckpt,
    prepares both with the accelerator and copies the EMA. `run` trains with the tree's loss.
    """

    def __init__(self, args, accelerator, model, optimizer, exp_dir):
        self.args, self.accelerator = args, accelerator
        self.exp_dir, self.checkpoint_dir = exp_dir, exp_dir / "checkpoints"
        self.logger = logging.getLogger("train")
        self.loader, self.sampler, self.num_items = latent_loader(args, accelerator)
        self.steps_per_epoch = self.sampler.batches_per_epoch // args.gradient_accumulation_steps
        self.steps, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.loss_log = LossLog(accelerator, exp_dir / "losses.jsonl", args.skip_nonfinite)
        ckpt = self.resume(model, optimizer) if args.resume_ckpt else None
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if ckpt is not None and accelerator.scaler is not None and ckpt.get("scaler"):
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        self.raw_model = accelerator.unwrap_model(self.model)
        self.ema = EMA(self.raw_model, args.ema_decay)
        if ckpt is not None:
            load_weights(self.ema.model, ckpt["ema"], self.resume_source, self.resume_hint)
        self.saved_rng = ckpt.get("rng") if ckpt is not None else None
        self.compiling = resolve_compile(args, accelerator.device)  # until the first step has built the kernels
        if self.compiling:
            compile_models(self.raw_model, self.ema.model)

    def resume(self, model, optimizer):
        """Loads --resume-ckpt into the model, the optimizer and the counters; returns the checkpoint."""
        args = self.args
        path = resolve_resume(args.resume_ckpt, self.checkpoint_dir)
        # Every process loads the file itself: one that cannot would fail alone and leave the others at a barrier.
        missing = [rank for rank, readable in enumerate(gather_object([path.is_file()])) if not readable]
        if missing:
            raise UserError(f"--resume-ckpt {path}: no such file on process(es) {missing}; with several nodes, put "
                            "it where every node can read it")
        ckpt = load_checkpoint(path, "--resume-ckpt")
        self.resume_source = f"--resume-ckpt {path}"
        self.resume_hint = f"--model {args.model} --resolution {args.resolution} --num-classes {args.num_classes}"
        load_weights(model, ckpt["model"], self.resume_source, self.resume_hint)
        load_optimizer_state(optimizer, ckpt["opt"], self.resume_source)
        self.steps, self.epoch = ckpt["steps"], ckpt["epoch"]
        if "rng" not in ckpt:  # written by the released train.py: it continues that epoch from a new shuffle
            self.logger.info(f"{path} holds no RNG state or data position (a checkpoint of the released code): "
                             f"continuing at step {self.steps} from the start of epoch {self.epoch}, not "
                             "bit-identical to an uninterrupted run")
        self.batch_in_epoch = ckpt.get("batch_in_epoch", 0)
        if self.batch_in_epoch >= self.sampler.batches_per_epoch:  # an epoch checkpoint: that epoch is done
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.loss_log.nonfinite_skipped = ckpt.get("nonfinite_skipped", 0)
        if "rng" in ckpt and len(ckpt["rng"]) != self.accelerator.num_processes:
            raise UserError(f"--resume-ckpt {path} was written by {len(ckpt['rng'])} processes; resume with "
                            "the same number for an exact resume")
        self.logger.info(f"resumed from {path} at step {self.steps} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        return ckpt

    def step_position(self):
        """(epoch, batch_in_epoch) of a step checkpoint: where the next batch comes from, so at an epoch's end the
        next epoch's start, the epoch the released code's step checkpoints record there too."""
        if self.batch_in_epoch == self.sampler.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.batch_in_epoch

    def checkpoint_state(self, rngs, position):
        """What a checkpoint holds (docs/checkpoints.md): the released keys, then what an exact resume needs."""
        scaler = self.accelerator.scaler
        epoch, batch_in_epoch = position
        return {"model": self.raw_model.state_dict(), "ema": self.ema.model.state_dict(),
                "opt": self.optimizer.state_dict(), "args": self.args, "epoch": epoch, "steps": self.steps,
                "batch_in_epoch": batch_in_epoch, "nonfinite_skipped": self.loss_log.nonfinite_skipped,
                "rng": rngs, "scaler": scaler.state_dict() if scaler is not None else None}

    def save(self, name, keep_last=0, position=None):
        """Flushes the loss log, then writes checkpoints/name with every process's RNG state; `position`
        (epoch, batch_in_epoch) defaults to `step_position`."""
        self.loss_log.flush()
        rngs = gather_object([rng_state()])
        if self.accelerator.is_main_process:
            state = self.checkpoint_state(rngs, position or self.step_position())
            write_checkpoint(state, self.checkpoint_dir, name, keep_last)
            self.logger.info(f"saved checkpoint {self.checkpoint_dir / name}")
        self.accelerator.wait_for_everyone()

    def announce(self):
        """args.json, the run's summary line, the trackers, and the loss log cut back to the resumed step."""
        args, accelerator = self.args, self.accelerator
        if accelerator.is_main_process:
            (self.exp_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
            params = sum(p.numel() for p in self.raw_model.parameters())
            self.logger.info(f"{args.model}: {params:,} parameters; {self.num_items:,} items; "
                             f"{self.steps_per_epoch} steps per epoch; {accelerator.num_processes} process(es)")
            accelerator.init_trackers("SRA", config=vars(args), init_kwargs={"wandb": {"name": args.exp_name}})
        self.loss_log.truncate(self.steps)

    def run(self, loss_fn, align_base_weight, after_step=None):
        """Trains until --max-train-steps or --epochs, or a signal. after_step(steps), if given, runs
        after each optimizer step (SiT's sample grid). The saved RNG is restored here, last, so that
        nothing built before shifts the training draws."""
        args = self.args
        self.announce()
        if self.saved_rng is not None:
            set_rng_state(self.saved_rng[self.accelerator.process_index])
        stop = StopRequest()
        max_steps = min(args.max_train_steps, args.epochs * self.steps_per_epoch)  # the last step is always saved
        self.loss_log.progress = tqdm(total=max_steps, initial=self.steps, desc="steps",
                                      disable=not self.accelerator.is_main_process)
        outcome = "finished" if self.steps >= max_steps else None
        while outcome is None and self.epoch < args.epochs:
            align_w = 0.0 if args.no_sra else align_weight(args.loss_type, self.epoch, args.resolution,
                                                           align_base_weight)
            outcome = self.run_epoch(loss_fn, align_w, max_steps, stop, after_step)
        if outcome == "stopped":
            self.logger.info(f"stopped by a signal at step {self.steps}; resume with --resume-ckpt latest "
                             f"--exp-name {args.exp_name} --output-dir {args.output_dir}")
            return
        self.loss_log.flush()
        self.loss_log.progress.close()
        for tracker in self.accelerator.trackers:  # accelerator.end_training without its destroy_process_group,
            tracker.finish()  # which utils.run_main does: it must see the gloo group to end the process safely
        self.logger.info(f"done: {self.steps} steps, checkpoints in {self.checkpoint_dir}")

    def step(self, loss_fn, moments, labels, align_w):
        """`train_step`. In a compiled run the first call, in which torch.compile builds the kernels,
        is timed and logged, and a compile failure ends the run with one line naming --no-compile."""
        args, accelerator = self.args, self.accelerator
        step = lambda: train_step(accelerator, self.model, self.optimizer, loss_fn, self.ema, moments, labels,
                                  align_w, args.max_grad_norm)
        if not self.compiling:
            return step()
        from torch._dynamo.exc import BackendCompilerFailed

        start = time.perf_counter()
        try:
            losses = step()
        except BackendCompilerFailed as e:
            reason = error_reason(e)
            raise UserError(f"--compile: torch.compile failed ({reason}); train without compiling with "
                            "--no-compile") from None
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)
        self.compiling = False
        self.logger.info(f"first step, compiling included: {time.perf_counter() - start:.1f} s")
        return losses

    def run_epoch(self, loss_fn, align_w, max_steps, stop, after_step):
        """Steps through the rest of this epoch; returns "stopped", "finished", or None at its end. An epoch that
        ends writes epoch-E.pt every --checkpoint-epochs epochs, named and recorded as released: E is the 0-based
        epoch just done (epoch-199.pt after 200 epochs)."""
        args, accelerator = self.args, self.accelerator
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        outcome = None
        for moments, labels in self.loader:
            moments = moments.to(accelerator.device, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            losses = self.step(loss_fn, moments, labels, align_w)
            self.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            self.steps += 1
            self.loss_log.progress.update(1)
            self.loss_log.append(self.steps, self.epoch, losses)
            finished = self.steps >= max_steps
            if self.steps % args.log_every == 0 or finished:
                self.loss_log.flush()
            if after_step is not None:
                after_step(self.steps)
            stopping = stop.agreed(accelerator, at_sync_point=self.steps % args.log_every == 0)
            if finished or stopping or self.steps % args.checkpoint_steps == 0:
                self.save(f"step-{self.steps}.pt", args.keep_last)
            if stopping or finished:
                outcome = "stopped" if stopping else "finished"
                break
        if self.batch_in_epoch == self.sampler.batches_per_epoch:
            if (self.epoch + 1) % args.checkpoint_epochs == 0:
                self.save(f"epoch-{self.epoch}.pt", position=(self.epoch, self.batch_in_epoch))
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return outcome
