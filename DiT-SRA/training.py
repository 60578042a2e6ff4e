"""Pieces of the training loop that both trees share: the resumable batch order, RNG state,
the EMA update, pre-emption signals and the checkpoint folder.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

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
    """ema = decay * ema + (1 - decay) * param, for all parameters at once."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)


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
