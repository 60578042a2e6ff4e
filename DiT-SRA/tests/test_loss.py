"""DiT's SRALoss against a plainly written version of the SRA objective for DiT."""
import pytest
import torch
import torch.nn.functional as F
from conftest import student_and_teacher

from alignment import align_weight
from diffusion import create_diffusion
from loss import SRALoss
from train import ALIGN_BASE_WEIGHT

DIFFUSION = create_diffusion("")


def reference_loss(model, teacher, x0, y, loss_type, t_max, cfg_prob, s, t_depth):
    """Draws t, noise, t_teacher, dropout in that order; DDPM terms from the (separately tested) diffusion."""
    n = x0.shape[0]
    t = torch.randint(0, 1000, (n,))
    noise = torch.randn_like(x0)
    t_teacher = torch.clamp(t - torch.randint(0, int(1000 * t_max), (n,)), 1, 999)
    acp = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def q_sample(steps):
        a = acp[steps].float().view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    x_t, x_teacher = q_sample(t), q_sample(t_teacher)
    if cfg_prob > 0:
        y = torch.where(torch.rand(n) < cfg_prob, 10, y)
    out, h_s = model(x_t, t, y, align_depth=s)
    h_t = teacher.features(x_teacher, t_teacher, y, depth=t_depth)
    mse = ((out[:, :4] - noise) ** 2).mean(dim=(1, 2, 3))
    vb = DIFFUSION.training_losses_from_output(out, x0, x_t, t, noise)["vb"]
    align = {"sml1": lambda: F.smooth_l1_loss(h_s, h_t, beta=0.05), "l2": lambda: ((h_s - h_t) ** 2).mean(),
             "l1": lambda: (h_s - h_t).abs().mean(),
             "cos": lambda: 1 - (h_s * h_t).sum(1) / (h_s.norm(dim=1) * h_t.norm(dim=1)).clamp_min(1e-8)}[loss_type]()
    return mse + vb, align


@pytest.mark.parametrize("loss_type", ["sml1", "l2", "l1", "cos"])
def test_loss_equals_an_independent_reimplementation(loss_type):
    model, teacher = student_and_teacher()
    g = torch.Generator().manual_seed(3)
    x0, y = torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    loss_fn = SRALoss(DIFFUSION, block_out_s=1, block_out_t=3, t_max=0.3, loss_type=loss_type, cfg_prob=0.4,
                      num_classes=10, teacher=teacher)
    torch.manual_seed(7)
    denoising, align = loss_fn(model, x0, y)
    after = torch.rand(1)
    torch.manual_seed(7)
    with torch.no_grad():
        ref_denoising, ref_align = reference_loss(model, teacher, x0, y, loss_type, 0.3, 0.4, 1, 3)
    torch.testing.assert_close(denoising, ref_denoising, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(align, ref_align, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, torch.rand(1)), "the loss drew a different number of random values"


def test_vb_term_trains_only_the_variance_channels():
    model, teacher = student_and_teacher()
    x0, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
    torch.manual_seed(0)
    denoising, _ = SRALoss(DIFFUSION, block_out_s=1, block_out_t=3, num_classes=10, teacher=teacher)(model, x0, y)
    assert denoising.shape == (4,) and torch.isfinite(denoising).all()
    denoising.mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_step_is_never_noisier_except_at_the_clamp():
    model, teacher = student_and_teacher()
    seen = {}

    def recording(name, call):
        def wrapped(x, t, y, **kwargs):
            seen[name] = t
            return call(x, t, y, **kwargs)
        return wrapped

    model.forward = recording("t", model.forward)
    teacher.features = recording("t_teacher", teacher.features)
    x0, y = torch.randn(512, 4, 8, 8), torch.randint(0, 10, (512,))
    SRALoss(DIFFUSION, block_out_s=1, block_out_t=3, t_max=0.2, num_classes=10, teacher=teacher)(model, x0, y)
    t, t_teacher = seen["t"], seen["t_teacher"]
    assert (t_teacher <= torch.clamp(t, min=1)).all() and (t_teacher >= 1).all()
    assert (t - t_teacher < 200).all() and (t - t_teacher > 100).any()


def test_dit_alignment_weight_uses_base_0_4():
    assert align_weight("sml1", 0, 256, ALIGN_BASE_WEIGHT) == pytest.approx(0.04)
    assert align_weight("sml1", 1149, 256, ALIGN_BASE_WEIGHT) == pytest.approx(0.004)
    assert align_weight("sml1", 899, 512, ALIGN_BASE_WEIGHT) == pytest.approx(0.004)


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
    loss_fn = SRALoss(DIFFUSION, block_out_s=1, block_out_t=3, num_classes=10, teacher=recording, teacher_fp32=teacher_fp32)
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
