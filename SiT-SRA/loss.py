"""The SRA objective for SiT: flow-matching denoising loss + self-representation alignment.

The student sees x_t at time t and its block `block_out_s` features (through the ap_head) are
pulled toward the EMA teacher's raw block `block_out_t` features at the less noisy time
t_teacher = clamp(t - t_max * u, 0, 1), u ~ U(0, 1), built from the same data and noise.
"""
import math

import torch

from alignment import alignment, check_loss_type, teacher_features
from path import PATH_TYPES, interpolant


def mean_flat(x):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


class SRALoss:
    """loss_fn(model, x0, y) -> (denoising (N,), alignment as `alignment.alignment` returns it).

    teacher: the EMA model, whose `features` up to block `block_out_t` are the targets, or None for
    the no-SRA baseline (alignment 0, no teacher forward). teacher_fp32: run it in float32 outside the
    caller's autocast, as the released code did (`alignment.teacher_features`).

    Random draws, in the released code's order (from the same RNG state, the released step's losses;
    docs/training.md): t and t_teacher on the CPU default generator, then the noise and the class
    dropout on x0's device.
    The times reach the device in one copy from pinned memory, so the step does not wait on the GPU.
    """

    def __init__(self, prediction="v", path_type="linear", weighting="uniform", block_out_s=8, block_out_t=20,
                 t_max=0.2, loss_type="cos", cfg_prob=0.1, num_classes=1000, teacher=None,
                 teacher_fp32=False):
        if prediction != "v":
            raise ValueError(f"prediction {prediction!r} is not supported: SiT-SRA predicts the velocity 'v'")
        if weighting not in ("uniform", "lognormal"):
            raise ValueError(f"unknown weighting {weighting!r}: use 'uniform' or 'lognormal'")
        check_loss_type(loss_type)
        if path_type not in PATH_TYPES:
            raise ValueError(f"unknown path type {path_type!r}: use one of {PATH_TYPES}")
        self.path_type = path_type
        self.weighting = weighting
        self.block_out_s = block_out_s
        self.block_out_t = block_out_t
        self.t_max = t_max
        self.loss_type = loss_type
        self.cfg_prob = cfg_prob
        self.num_classes = num_classes
        self.teacher = teacher
        self.teacher_fp32 = teacher_fp32

    def sample_times(self, batch_size):
        """Student and teacher times (N, 1, 1, 1) on the CPU; the teacher's are never noisier."""
        if self.weighting == "uniform":
            t = torch.rand(batch_size, 1, 1, 1)
        else:
            sigma = torch.randn(batch_size, 1, 1, 1).exp()
            t = sigma / (1 + sigma) if self.path_type == "linear" else 2 / math.pi * torch.atan(sigma)
        t_teacher = torch.clamp(t - self.t_max * torch.rand_like(t), 0, 1)
        return t, t_teacher

    def __call__(self, model, x0, y):
        times = torch.cat(self.sample_times(x0.shape[0]))
        if x0.device.type == "cuda":  # from pinned memory the copy does not wait for the GPU
            times = times.pin_memory()
        t, t_teacher = times.to(device=x0.device, dtype=x0.dtype, non_blocking=True).chunk(2)
        noise = torch.randn_like(x0)
        alpha, sigma, d_alpha, d_sigma = interpolant(t, self.path_type)
        x_t = alpha * x0 + sigma * noise
        target = d_alpha * x0 + d_sigma * noise
        alpha_teacher, sigma_teacher, _, _ = interpolant(t_teacher, self.path_type)
        x_teacher = alpha_teacher * x0 + sigma_teacher * noise

        if self.cfg_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.cfg_prob
            y = torch.where(drop, self.num_classes, y)

        if self.teacher is None:  # the no-SRA baseline: plain flow matching
            prediction = model(x_t, t.flatten(), y)
            return mean_flat((prediction - target) ** 2), torch.zeros((), device=x0.device)
        prediction, h_student = model(x_t, t.flatten(), y, align_depth=self.block_out_s)
        h_teacher = teacher_features(self.teacher, x_teacher, t_teacher.flatten(), y, self.block_out_t, self.teacher_fp32)
        denoising = mean_flat((prediction - target) ** 2)
        return denoising, alignment(h_student, h_teacher, self.loss_type)
