"""SRA's alignment loss between student and teacher features, and its weight per epoch.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import contextlib

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sml1", "l2", "l1", "cos")


def check_loss_type(loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}: use one of {LOSS_TYPES}")


def alignment(h_student, h_teacher, loss_type):
    """Alignment loss between (N, T, D) features: a scalar, or (N, D) for 'cos'.

    'cos' is PyTorch's default cosine similarity over dim=1, i.e. over the TOKEN axis (one
    similarity per channel), which is what the released SiT code computes.
    """
    if loss_type == "sml1":
        return F.smooth_l1_loss(h_student, h_teacher, beta=0.05)
    if loss_type == "l2":
        return F.mse_loss(h_student, h_teacher)
    if loss_type == "l1":
        return F.l1_loss(h_student, h_teacher)
    check_loss_type(loss_type)
    return 1 - F.cosine_similarity(h_student, h_teacher)


def teacher_features(teacher, x, t, y, depth, fp32=False):
    """The teacher's block-`depth` tokens (N, T, D) for x (N, C, H, W), times t (N,) and labels y (N,), without
    gradient. fp32: computed in float32 outside any autocast, as the released code ran its EMA teacher; otherwise
    under the caller's autocast (faster, rounded to its dtype)."""
    precision = torch.autocast(x.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    with torch.no_grad(), precision:
        return teacher.features(x, t, y, depth=depth)


def align_weight(loss_type, epoch, resolution, base):
    """Weight of the alignment loss at `epoch` (0-based): constant 0.5 for 'cos', else `base`
    (SiT 2.0, DiT 0.4) decayed by 10x over 1000 epochs after epoch 149 (256 px) or 800 epochs
    after 99 (512 px)."""
    if loss_type == "cos":
        return 0.5
    start, length = (99, 800) if resolution >= 512 else (149, 1000)
    exponent = (epoch - start) / length + 1 if epoch > start else 1
    return base * 0.1 ** exponent
