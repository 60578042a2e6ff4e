"""SRALoss against a plainly written reimplementation of the SRA objective for SiT, plus its invariants."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import student_and_teacher

from alignment import align_weight
from loss import SRALoss
from path import interpolant
from train import ALIGN_BASE_WEIGHT


def reference_loss(model, teacher, x0, y, path_type, weighting, loss_type, t_max, cfg_prob, num_classes, s, t_depth):
    """The objective, with the released code's draws in their order (docs/training.md), written out without the code under test."""
    n = x0.shape[0]
    if weighting == "uniform":
        t = torch.rand(n, 1, 1, 1)
    else:
        sigma = torch.exp(torch.randn(n, 1, 1, 1))
        t = sigma / (1 + sigma) if path_type == "linear" else 2 / math.pi * torch.atan(sigma)
    t_teacher = torch.clamp(t - t_max * torch.rand_like(t), 0, 1)
    noise = torch.randn_like(x0)

    def state(time):
        if path_type == "linear":
            return (1 - time) * x0 + time * noise, -x0 + noise
        a, b = torch.cos(math.pi * time / 2), torch.sin(math.pi * time / 2)
        return a * x0 + b * noise, -math.pi / 2 * b * x0 + math.pi / 2 * a * noise

    x_t, v = state(t)
    x_teacher, _ = state(t_teacher)
    if cfg_prob > 0:
        y = torch.where(torch.rand(n) < cfg_prob, num_classes, y)
    pred, h_s = model(x_t, t.flatten(), y, align_depth=s)
    h_t = teacher.features(x_teacher, t_teacher.flatten(), y, depth=t_depth)
    denoising = ((pred - v) ** 2).mean(dim=(1, 2, 3))
    align = {"sml1": lambda: F.smooth_l1_loss(h_s, h_t, beta=0.05), "l2": lambda: ((h_s - h_t) ** 2).mean(),
             "l1": lambda: (h_s - h_t).abs().mean(),
             "cos": lambda: 1 - (h_s * h_t).sum(1) / (h_s.norm(dim=1) * h_t.norm(dim=1)).clamp_min(1e-8)}[loss_type]()
    return denoising, align


@pytest.mark.parametrize("loss_type", ["sml1", "l2", "l1", "cos"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
def test_loss_equals_an_independent_reimplementation(loss_type, path_type, weighting):
    model, teacher = student_and_teacher()
    g = torch.Generator().manual_seed(3)
    x0, y = torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    loss_fn = SRALoss(path_type=path_type, weighting=weighting, block_out_s=1, block_out_t=3, t_max=0.3,
                      loss_type=loss_type, cfg_prob=0.4, num_classes=10, teacher=teacher)
    torch.manual_seed(7)
    denoising, align = loss_fn(model, x0, y)
    after = torch.rand(1)
    torch.manual_seed(7)
    with torch.no_grad():
        ref_denoising, ref_align = reference_loss(model, teacher, x0, y, path_type, weighting, loss_type, 0.3, 0.4,
                                                  10, 1, 3)
    assert denoising.shape == (6,)
    assert align.shape == ((6, 32) if loss_type == "cos" else ())
    torch.testing.assert_close(denoising, ref_denoising, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(align, ref_align, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, torch.rand(1)), "the loss drew a different number of random values"


def test_gradients_reach_the_student_and_never_the_teacher():
    model, teacher = student_and_teacher()
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    denoising, align = SRALoss(block_out_s=1, block_out_t=3, num_classes=10, teacher=teacher)(model, x0, y)
    (denoising.mean() + align.mean()).backward()
    assert model.ap_head.linear1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_no_dropout_draw_without_class_dropout():
    model, teacher = student_and_teacher()
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    loss_fn = SRALoss(block_out_s=1, block_out_t=3, cfg_prob=0.0, num_classes=10, teacher=teacher)
    torch.manual_seed(0)
    loss_fn(model, x0, y)
    after = torch.rand(1)
    torch.manual_seed(0)
    torch.rand(4, 1, 1, 1), torch.rand(4, 1, 1, 1), torch.randn_like(x0)
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_teacher_time_is_never_noisier(weighting, path_type):
    t, t_teacher = SRALoss(path_type=path_type, weighting=weighting, t_max=0.2).sample_times(10000)
    assert (t_teacher <= t).all() and (t_teacher >= 0).all() and (t - t_teacher <= 0.2 + 1e-7).all()
    assert ((t - t_teacher)[t > 0.2] > 0.1).any(), "the gap should spread up to t_max"


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_velocity_target_is_the_time_derivative_of_the_interpolant(path_type):
    x0, noise = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for t in (0.1, 0.37, 0.9):
        t = torch.tensor(t, dtype=torch.float64)
        h = 1e-6

        def x_at(s):
            alpha, sigma, _, _ = interpolant(s, path_type)
            return alpha * x0 + sigma * noise

        finite_difference = (x_at(t + h) - x_at(t - h)) / (2 * h)
        _, _, d_alpha, d_sigma = interpolant(t, path_type)
        torch.testing.assert_close(d_alpha * x0 + d_sigma * noise, finite_difference, rtol=1e-6, atol=1e-8)


def test_alignment_weight_schedule():
    assert ALIGN_BASE_WEIGHT == 2.0
    assert align_weight("cos", 500, 256, ALIGN_BASE_WEIGHT) == 0.5
    assert align_weight("sml1", 0, 256, ALIGN_BASE_WEIGHT) == pytest.approx(0.2)
    assert align_weight("sml1", 149, 256, ALIGN_BASE_WEIGHT) == pytest.approx(0.2)
    assert align_weight("sml1", 1149, 256, ALIGN_BASE_WEIGHT) == pytest.approx(0.02)
    assert align_weight("sml1", 649, 256, ALIGN_BASE_WEIGHT) == pytest.approx(2 * 0.1 ** 1.5)
    assert align_weight("l2", 99, 512, ALIGN_BASE_WEIGHT) == pytest.approx(0.2)
    assert align_weight("l2", 899, 512, ALIGN_BASE_WEIGHT) == pytest.approx(0.02)
    assert align_weight("sml1", 0, 256, base=0.4) == pytest.approx(0.04)


def test_unknown_options_are_errors():
    with pytest.raises(ValueError, match="loss type"):
        SRALoss(loss_type="huber")
    with pytest.raises(ValueError, match="path type"):
        SRALoss(path_type="vp")
    with pytest.raises(ValueError, match="prediction"):
        SRALoss(prediction="noise")


class RecordingTeacher:
    """The real teacher, keeping each `features` call's inputs and output (the targets the loss aligns to)."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def features(self, *args, **kwargs):
        out = self.teacher.features(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.mark.parametrize("teacher_fp32", [True, False])
def test_teacher_fp32_runs_the_teacher_in_float32_outside_the_students_autocast(teacher_fp32):
    model, teacher = student_and_teacher()
    recording = RecordingTeacher(teacher)
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    loss_fn = SRALoss(block_out_s=1, block_out_t=3, num_classes=10, teacher=recording, teacher_fp32=teacher_fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(model, x0, y)
    [(args, kwargs, features)] = recording.calls
    with torch.no_grad():  # the same inputs in plain float32, outside any autocast
        float32 = teacher.features(*args, **kwargs)
    assert args[0].dtype == torch.float32 and float32.dtype == torch.float32
    if teacher_fp32:
        assert features.dtype == torch.float32 and torch.equal(features, float32)
    else:  # under the student's bfloat16 autocast: the same features, with bfloat16 rounding inside the blocks
        assert not torch.equal(features, float32)
        torch.testing.assert_close(features.float(), float32, rtol=0.05, atol=0.05)
