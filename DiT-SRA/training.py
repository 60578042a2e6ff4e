"""Pieces of the training loop that both trees share: the resumable batch order, RNG state,
one optimisation step with its EMA update, pre-emption signals and the checkpoint folder.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from dataset import sample_posterior
from utils import UserError, save_atomic

EMA_DECAY = 0.9999


class EpochBatchSampler(Sampler):
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), cut into global
    batches (the last partial one dropped), of which this process takes its slice. `set_epoch`
    can start inside an epoch, which is how a resumed run continues at the exact batch."""

    def __init__(self, num_items, batch_size, rank, world_size, seed):
        self.num_items, self.batch_size, self.rank, self.world_size, self.seed = (
            num_items, batch_size, rank, world_size, seed)
        self.global_batch = batch_size * world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.num_items // self.global_batch - self.start_batch

    def __iter__(self):
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for b in range(self.start_batch, self.num_items // self.global_batch):
            start = b * self.global_batch + self.rank * self.batch_size
            yield order[start:start + self.batch_size].tolist()


def rng_state():
    """Every RNG of this process, as plain Python objects (they travel through gather_object and
    load with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)["state"]
    state = {"python": random.getstate(), "torch": torch.get_rng_state().numpy().tobytes(),
             "numpy": {"key": numpy_state["key"].tolist(), "pos": numpy_state["pos"]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state):
    def as_tensor(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    random.setstate(state["python"])
    torch.set_rng_state(as_tensor(state["torch"]))
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np.array(state["numpy"]["key"], np.uint32),
                                                             "pos": state["numpy"]["pos"]}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_tensor(state["cuda"]))


@torch.no_grad()
def update_ema(ema_params, model_params, decay=EMA_DECAY):
    """ema = decay * ema + (1 - decay) * param, for all parameters at once, as ema += (1 - decay) (param - ema):
    one pass over the EMA instead of a multiply pass and an add pass."""
    torch._foreach_lerp_(ema_params, model_params, 1 - decay)


def clip_inside_fused_adamw(optimizer, parameters, max_grad_norm):
    """Gradient clipping as torch's clip_grad_norm_ (g * min(1, max_norm / (norm + 1e-6))) done by
    the fused AdamW kernel, which divides each gradient by `grad_scale` as it reads it: one pass
    over the gradients (the norm) instead of two. A non-finite norm sets `found_inf`, on which the
    kernel skips the update. Returns the gradient norm (0-dim tensor on the device)."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    optimizer.grad_scale = torch.clamp((grad_norm + 1e-6) / max_grad_norm, min=1.0)
    optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
    return grad_norm


def train_step(accelerator, model, optimizer, loss_fn, teacher, moments, labels, align_w, max_grad_norm,
               ema_params, model_params, phase_end=None, ema_decay=EMA_DECAY):
    """One micro-batch of SRA training as train.py runs it, without a host-device sync.

    accelerator, model, optimizer: prepared by `accelerator`; the optimizer is a fused AdamW, which
        also clips (`clip_inside_fused_adamw`) and skips the update on a non-finite gradient norm
        without a sync.
    loss_fn: the tree's SRALoss; teacher: the EMA model (or None for the no-SRA baseline).
    moments: (N, 8, h, w) posterior mean and std on the device; labels: (N,) long class ids.
    align_w: the alignment weight of this epoch; max_grad_norm: the clipping threshold.
    ema_params, model_params: the EMA's and the unwrapped model's parameter lists; the EMA moves
        after every optimizer step (not after a micro-batch that only accumulates).
    phase_end: optional callable(phase) called after "data", "loss_backward", "optimizer" and "ema",
        for a benchmark's instrumented pass; training passes None.
    ema_decay: the EMA's decay per optimizer step (0.9999 in the paper).
    Returns (denoising loss, alignment loss, gradient norm) as 0-dim device tensors; the gradient
    norm is None on a micro-batch that only accumulates.
    """
    mark = phase_end or (lambda phase: None)
    with accelerator.accumulate(model):
        x0 = sample_posterior(moments)
        mark("data")
        with accelerator.autocast():
            denoising, align = loss_fn(model, x0, teacher, labels)
            loss = denoising.mean() + align_w * align.mean()
        accelerator.backward(loss)
        mark("loss_backward")
        grad_norm = None
        if accelerator.sync_gradients:
            if accelerator.scaler is None:
                grad_norm = clip_inside_fused_adamw(optimizer.optimizer, model.parameters(), max_grad_norm)
            else:  # fp16: the GradScaler unscales first and sets grad_scale and found_inf itself
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm).detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
    if accelerator.sync_gradients:
        update_ema(ema_params, model_params, ema_decay)
        mark("ema")
    return denoising.detach().mean(), align.detach().mean(), grad_norm


# Flags that choose how the optimizer computes, not what: a checkpoint's (the released ones were written by a plain,
# non-fused AdamW, with fused=None) must not switch off the fused kernel that clips and skips inside its step.
OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer, state, source):
    """optimizer.load_state_dict(state) with this optimizer's implementation flags kept: moments, step counts and
    hyperparameters (lr, betas, ...) come from `state`, the kernel stays this optimizer's. UserError on a state of
    other parameters."""
    saved_groups = state.get("param_groups", []) if isinstance(state, dict) else []
    if len(saved_groups) != len(optimizer.param_groups):
        raise UserError(f"{source}: its optimizer state has {len(saved_groups)} parameter group(s), this optimizer "
                        f"{len(optimizer.param_groups)}")
    groups = [{**saved, **{k: own[k] for k in OPTIMIZER_IMPLEMENTATION if k in own}}
              for saved, own in zip(saved_groups, optimizer.param_groups)]
    try:
        optimizer.load_state_dict({**state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise UserError(f"{source}: its optimizer state does not fit this model's parameters ({e})") from None


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


def resolve_resume(resume, checkpoint_dir):
    """The checkpoint path of --resume-ckpt: a path, or 'latest' of this experiment."""
    if resume != "latest":
        return Path(resume)
    pointer = checkpoint_dir / "latest"
    if not pointer.is_file():
        raise UserError(f"--resume-ckpt latest: no checkpoint in {checkpoint_dir} yet")
    return checkpoint_dir / pointer.read_text().strip()


def write_checkpoint(ckpt, checkpoint_dir, name, keep_last=0):
    """Saves atomically, then points `latest` at it, then prunes to the `keep_last` newest step
    checkpoints: a crash at any moment leaves `latest` naming a complete file."""
    save_atomic(ckpt, checkpoint_dir / name)
    pointer = checkpoint_dir / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, checkpoint_dir / "latest")
    if keep_last > 0:
        by_step = sorted(checkpoint_dir.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        for old in by_step[:-keep_last]:
            old.unlink()
