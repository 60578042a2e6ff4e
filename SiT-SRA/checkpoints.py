"""Checkpoints of train.py: every RNG's state, the optimizer state of a checkpoint (ours or the released
code's), the --resume-ckpt path and the atomic write with its `latest` pointer. What a checkpoint holds is written
down in docs/training.md.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from utils import UserError, save_atomic


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
