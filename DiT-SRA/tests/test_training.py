"""Pieces of training.py's step: gradient clipping folded into the fused AdamW kernel against
clip_grad_norm_ then AdamW, and the EMA update against its formula. (The whole step against the
released code's is benchmarks/tests/test_reference_step.py.)"""
import pytest
import torch

import training

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, 0.01, 0.5
TOLERANCE = {"rtol": 1e-6, "atol": 1e-8}


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_clipping_inside_fused_adamw_equals_clip_grad_norm_then_adamw(scale):
    """Gradient norms below (0.1) and above (10) max_grad_norm: same norm, same update."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((5, 3), (7,))]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, plain):
        p.grad = scale * torch.randn_like(p)
        q.grad = p.grad.clone()
    folded_opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    plain_opt = torch.optim.AdamW(plain, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    norm = training.clip_inside_fused_adamw(folded_opt, params, MAX_GRAD_NORM)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(plain, MAX_GRAD_NORM))
    folded_opt.step()
    plain_opt.step()
    for p, q in zip(params, plain):
        torch.testing.assert_close(folded_opt.state[p]["exp_avg"], plain_opt.state[q]["exp_avg"], **TOLERANCE)
        torch.testing.assert_close(p, q, **TOLERANCE)


def test_clipping_inside_fused_adamw_skips_a_non_finite_gradient():
    param = torch.nn.Parameter(torch.randn(6))
    before = param.detach().clone()
    param.grad = torch.tensor([1.0, float("nan"), 0, 0, 0, 0])
    optimizer = torch.optim.AdamW([param], lr=LR, fused=True)
    norm = training.clip_inside_fused_adamw(optimizer, [param], MAX_GRAD_NORM)
    optimizer.step()
    assert not torch.isfinite(norm)
    assert torch.equal(param.detach(), before)


def test_ema_update_is_decay_times_ema_plus_the_rest_times_the_model():
    model = torch.nn.Linear(3, 2)
    ema = training.EMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in ema.model.parameters()]
    ema.update()
    for old, new, param in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * param.detach(), rtol=1e-6, atol=1e-7)
