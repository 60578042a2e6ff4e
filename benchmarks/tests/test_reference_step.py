"""training.train_step (what train.py runs) against the released code's step as rebuilt in
benchmarks/reference_step.py (full-depth float32 teacher, default AdamW, per-parameter EMA loop,
`.item()` every step): from the same state and seed, one float32 step on the CPU, in each tree.

Tolerances, uncompiled: the losses and the gradient norm are bitwise equal (the same float32
operations in the same order; the early-exit teacher only skips the blocks after K). The clipped
gradients (read back from Adam's first moment), parameters and EMA agree to rtol 1e-6, atol 1e-8,
about one float32 ulp at their scale: the fused AdamW kernel divides by the clipping's 1 / coef
where the released code multiplies by coef, and it and the foreach lerp of the EMA round
differently from the released per-parameter loops (measured: at most 1.5e-8 and 1.2e-7, on
entries near 1).
Compiled (inductor fuses and reorders float operations): losses to rtol 1e-5, gradients to 1e-4 of
the largest gradient entry (measured: 2e-6), parameters to atol lr and the EMA to atol 1e-7: Adam's
first update is lr * g / (|g| + eps), so where |g| is near eps a rounding difference in g moves that
entry by a fraction of lr (measured: 0.08 lr), and the EMA by 1e-4 of that.
"""
import copy
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from common import import_tree

LR, WEIGHT_DECAY, MAX_GRAD_NORM, ALIGN_W = 1e-3, 0.01, 0.5, 2.0
TOLERANCE = {"rtol": 1e-6, "atol": 1e-8}
COMPILED_TOLERANCE = {"model": {"rtol": 0, "atol": LR}, "ema": {"rtol": 1e-6, "atol": 1e-7}}
TIMES = {"SiT": torch.tensor([0.0, 0.5, 1.0]), "DiT": torch.tensor([0, 500, 999])}

Step = namedtuple("Step", "losses model ema grads")  # losses: [denoising, align, grad norm]; state dicts


@pytest.fixture(scope="module", params=["SiT", "DiT"])
def tree(request):
    """One tree's modules, a tiny model and its SRALoss (block 2 aligned to teacher block 4)."""
    family = request.param
    names = ("training", "loss", "models", "reference_step") + (("diffusion",) if family == "DiT" else ())
    training, loss, models, reference, *diffusion = import_tree(f"{family}-T/2", *names)
    registry = getattr(models, f"{family}_models")
    settings = dict(block_out_s=2, block_out_t=4, t_max=0.2, cfg_prob=0.5, num_classes=10)
    if diffusion:
        settings["diffusion"] = diffusion[0].create_diffusion("")
    return SimpleNamespace(
        family=family, training=training, reference=reference,
        new_model=lambda: registry[f"{family}-T/2"](input_size=4, num_classes=10),
        loss_fn=lambda teacher, **options: loss.SRALoss(teacher=teacher, **settings, **options))


@pytest.fixture(scope="module")
def mid_training_state(tree):
    """Perturbed weights (no zero-initialised gates), an EMA that differs from the model, a batch."""
    torch.manual_seed(0)
    model = tree.new_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moments = torch.cat([2 * torch.randn(4, 4, 4, 4), 0.01 + 0.1 * torch.rand(4, 4, 4, 4)], dim=1)
    labels = torch.randint(0, 10, (4,))
    return model.state_dict(), ema.state_dict(), moments, labels


def result(losses, raw, ema, optimizer):
    """The step's outcome; the clipped gradients are Adam's first moment after one step / (1 - beta1)."""
    beta1 = optimizer.param_groups[0]["betas"][0]
    grads = {name: optimizer.state[p]["exp_avg"] / (1 - beta1) for name, p in raw.named_parameters()
             if p in optimizer.state}
    return Step(losses, raw.state_dict(), ema.state_dict(), grads)


def cpu_accelerator(precision):
    """An Accelerator on the CPU with --mixed-precision `precision`; accelerate keeps one process-wide state, which
    refuses another precision, so it is reset first."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision=precision)


def fast_step(tree, state, ema_state, moments, labels, seed, compile=False, precision="no", teacher_fp32=False):
    """As train.py: fused AdamW, training.EMA copied after prepare, training.compile_models with
    --compile, training.train_step; --mixed-precision `precision`, --teacher-fp32 `teacher_fp32`."""
    accelerator = cpu_accelerator(precision)
    model = tree.new_model()
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    ema = tree.training.EMA(raw)
    ema.model.load_state_dict(ema_state)
    if compile:
        tree.training.compile_models(raw, ema.model)
    torch.manual_seed(seed)
    losses = tree.training.train_step(accelerator, model, optimizer, tree.loss_fn(ema.model, teacher_fp32=teacher_fp32),
                                      ema, moments, labels, ALIGN_W, MAX_GRAD_NORM)
    return result([value.item() for value in losses], raw, ema.model, optimizer)


def reference_run(tree, state, ema_state, moments, labels, seed, precision="no"):
    """As the released code: EMA copied before prepare, default AdamW, reference_step."""
    accelerator = cpu_accelerator(precision)
    model = tree.new_model()
    model.load_state_dict(state)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema.load_state_dict(ema_state)
    optimizer = tree.reference.reference_optimizer(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    torch.manual_seed(seed)
    losses = tree.reference.reference_step(accelerator, model, optimizer,
                                           tree.loss_fn(tree.reference.FullDepthTeacher(ema)), moments, labels,
                                           ALIGN_W, MAX_GRAD_NORM, ema, raw)
    return result(list(losses), raw, ema, optimizer)


def test_one_step_gives_the_reference_losses_gradients_parameters_and_ema(tree, mid_training_state):
    state = mid_training_state[0]
    fast = fast_step(tree, *mid_training_state, seed=1)
    ref = reference_run(tree, *mid_training_state, seed=1)

    assert fast.losses == ref.losses
    assert fast.losses[2] > MAX_GRAD_NORM, "the gradient was not clipped; the test would miss the clipping"
    assert fast.grads.keys() == ref.grads.keys() and len(ref.grads) == sum(p.requires_grad for p in
                                                                           tree.new_model().parameters())
    for name, grad in ref.grads.items():
        torch.testing.assert_close(fast.grads[name], grad, **TOLERANCE, msg=f"gradient of {name}")
    moved = 0
    for name, value in ref.model.items():
        torch.testing.assert_close(fast.model[name], value, **TOLERANCE, msg=f"model {name}")
        torch.testing.assert_close(fast.ema[name], ref.ema[name], **TOLERANCE, msg=f"ema {name}")
        moved += not torch.equal(value, state[name])
    assert moved > len(state) // 2, "the step barely changed the model; the comparison proves little"


def test_compiled_step_gives_the_reference_step_and_plain_parameter_names(tree, mid_training_state):
    state = mid_training_state[0]
    fast = fast_step(tree, *mid_training_state, seed=1, compile=True)
    ref = reference_run(tree, *mid_training_state, seed=1)

    torch.testing.assert_close(fast.losses, ref.losses, rtol=1e-5, atol=0)
    largest = max(grad.abs().max() for grad in ref.grads.values()).item()
    for name, grad in ref.grads.items():
        torch.testing.assert_close(fast.grads[name], grad, rtol=0, atol=1e-4 * largest, msg=f"gradient of {name}")
    assert list(fast.model) == list(state) and list(fast.ema) == list(state), "compilation renamed parameters"
    for name, value in ref.model.items():
        torch.testing.assert_close(fast.model[name], value, **COMPILED_TOLERANCE["model"], msg=f"model {name}")
        torch.testing.assert_close(fast.ema[name], ref.ema[name], **COMPILED_TOLERANCE["ema"], msg=f"ema {name}")


def test_teacher_fp32_gives_the_reference_losses_under_bf16(tree, mid_training_state):
    """Under bf16 autocast the released teacher runs in float32 outside it: --teacher-fp32 gives the released step's
    losses and gradient norm bit for bit; our default (the teacher under autocast) moves the alignment loss only."""
    ref = reference_run(tree, *mid_training_state, seed=1, precision="bf16")
    released = fast_step(tree, *mid_training_state, seed=1, precision="bf16", teacher_fp32=True)
    autocast = fast_step(tree, *mid_training_state, seed=1, precision="bf16")
    assert released.losses == ref.losses
    assert autocast.losses[0] == ref.losses[0] and autocast.losses[1] != ref.losses[1]
    assert autocast.losses[1] == pytest.approx(ref.losses[1], rel=0.05)


def test_a_different_seed_gives_different_losses(tree, mid_training_state):
    assert fast_step(tree, *mid_training_state, seed=1).losses != fast_step(tree, *mid_training_state, seed=2).losses


@pytest.mark.parametrize("depth", range(1, 7))
def test_early_exit_teacher_equals_full_depth_teacher(tree, mid_training_state, depth):
    ema = tree.new_model().eval()
    ema.load_state_dict(mid_training_state[1])
    x, t, y = torch.randn(3, 4, 4, 4), TIMES[tree.family], torch.tensor([1, 10, 3])
    with torch.no_grad():
        early = ema.features(x, t, y, depth=depth)
    assert torch.equal(early, tree.reference.FullDepthTeacher(ema).features(x, t, y, depth=depth))
