"""training_losses_from_output: MSE term, variational-bound term (closed form, decoder NLL at
t = 0), detached mean, loss-type variants, and training_losses as its model-calling wrapper.

Closed forms here are computed in float64 from the definition of the schedule:
abar_t = prod (1 - beta_s), beta linear 1e-4..0.02; x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);
posterior mean c1 x + c2 x_t; model log variance frac log beta_t + (1 - frac) log btilde_t
(btilde_0 replaced by btilde_1), frac = (v + 1) / 2.
"""

import math

import numpy as np
import pytest
import torch
from diffusion import create_diffusion

BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHA_BAR = np.cumprod(1 - BETAS)
SHAPE = (6, 3, 4, 4)


def _batch(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_start = torch.rand(SHAPE, generator=g) * 1.8 - 0.9
    noise = torch.randn(SHAPE, generator=g)
    t = torch.tensor(steps)
    # eps close to the true noise and v in [-1, 1], so that every term is moderate
    eps = noise + 0.1 * torch.randn(SHAPE, generator=g)
    v = torch.rand(SHAPE, generator=g) * 2 - 1
    return x_start, noise, t, eps, v


def _reference_model_gaussian(x_t, t, eps, v):
    """float64 (mean, log variance) of p(x_{t-1} | x_t) for step t (scalar int)."""
    a, beta = ALPHA_BAR[t], BETAS[t]
    x0_hat = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mean = _posterior_mean(x0_hat, x_t, t)
    btilde = lambda s: BETAS[s] * (1 - ALPHA_BAR[s - 1]) / (1 - ALPHA_BAR[s])
    min_log = math.log(btilde(t) if t > 0 else btilde(1))
    frac = (v + 1) / 2
    return mean, frac * math.log(beta) + (1 - frac) * min_log


def _posterior_mean(x0, x_t, t):
    a, a_prev, beta = ALPHA_BAR[t], (ALPHA_BAR[t - 1] if t > 0 else 1.0), BETAS[t]
    return beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * x_t


def _phi(x):
    """The tanh approximation of the normal CDF (the decoder's), in float64."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _losses(diffusion, x_start, noise, t, output):
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    return x_t, diffusion.training_losses_from_output(output, x_start, x_t, t, noise)


def test_mse_term():
    diffusion = create_diffusion("")
    x_start, noise, t, eps, v = _batch([0, 1, 10, 250, 600, 999])
    _, terms = _losses(diffusion, x_start, noise, t, torch.cat([eps, v], dim=1))
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(value.shape == (6,) for value in terms.values())
    torch.testing.assert_close(terms["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_is_posterior_kl_in_bits():
    """t > 0: vb = mean over dims of KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2, with
    KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2.
    Tolerance: relative 1e-3 (float32 computation against float64)."""
    diffusion = create_diffusion("")
    steps = [1, 2, 10, 250, 600, 999]
    x_start, noise, t, eps, v = _batch(steps)
    x_t, terms = _losses(diffusion, x_start, noise, t, torch.cat([eps, v], dim=1))
    for i, s in enumerate(steps):
        x0, xt = x_start[i].double(), x_t[i].double()
        m2, logvar2 = _reference_model_gaussian(xt, s, eps[i].double(), v[i].double())
        m1 = _posterior_mean(x0, xt, s)
        logvar1 = math.log(BETAS[s] * (1 - ALPHA_BAR[s - 1]) / (1 - ALPHA_BAR[s]))
        kl = 0.5 * (logvar2 - logvar1) + (math.exp(logvar1) + (m1 - m2) ** 2) / (2 * torch.exp(logvar2)) - 0.5
        expected = kl.mean().item() / math.log(2)
        assert terms["vb"][i].item() == pytest.approx(expected, rel=1e-3)


def test_vb_term_at_step_zero_is_decoder_nll():
    """t = 0: vb = -mean over dims of log P(bin of x_0) / ln 2 under N(mean, sigma^2) with the
    bin [x_0 - 1/255, x_0 + 1/255]; relative tolerance 1e-3."""
    diffusion = create_diffusion("")
    x_start, noise, t, eps, v = _batch([0] * 6, seed=1)
    x_t, terms = _losses(diffusion, x_start, noise, t, torch.cat([eps, v], dim=1))
    for i in range(6):
        mean, logvar = _reference_model_gaussian(x_t[i].double(), 0, eps[i].double(), v[i].double())
        x0, inv_std = x_start[i].double(), torch.exp(-0.5 * logvar)
        mass = _phi(inv_std * (x0 - mean + 1 / 255)) - _phi(inv_std * (x0 - mean - 1 / 255))
        expected = -torch.log(mass.clamp(min=1e-12)).mean().item() / math.log(2)
        assert terms["vb"][i].item() == pytest.approx(expected, rel=1e-3)


def test_vb_gradient_reaches_only_the_variance_channels():
    diffusion = create_diffusion("")
    x_start, noise, t, eps, v = _batch([0, 3, 50, 400, 800, 999], seed=2)
    output = torch.cat([eps, v], dim=1).requires_grad_(True)
    _, terms = _losses(diffusion, x_start, noise, t, output)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.all(grad_vb[:, :3] == 0)
    assert torch.all(grad_vb[:, 3:].abs().sum(dim=(1, 2, 3)) > 0)
    (grad_loss,) = torch.autograd.grad(terms["loss"].sum(), output)
    d = 3 * 4 * 4
    torch.testing.assert_close(grad_loss[:, :3], 2 * (eps - noise) / d)
    torch.testing.assert_close(grad_loss[:, 3:], grad_vb[:, 3:])


def test_rescaled_mse_scales_vb():
    """RESCALED_MSE multiplies vb by T / 1000 (0.25 for 250 steps); plain MSE leaves it alone.
    For the 1000-step training diffusion the two coincide."""
    x_start, noise, t, eps, v = _batch([0, 1, 5, 100, 200, 249], seed=3)
    output = torch.cat([eps, v], dim=1)
    _, plain = _losses(create_diffusion("250"), x_start, noise, t, output)
    _, rescaled = _losses(create_diffusion("250", rescale_learned_sigmas=True), x_start, noise, t, output)
    torch.testing.assert_close(rescaled["vb"], 0.25 * plain["vb"])
    torch.testing.assert_close(rescaled["mse"], plain["mse"])
    torch.testing.assert_close(rescaled["loss"], rescaled["mse"] + 0.25 * plain["vb"])
    t_full = torch.tensor([0, 1, 5, 100, 200, 999])
    _, full = _losses(create_diffusion(""), x_start, noise, t_full, output)
    _, full_rescaled = _losses(create_diffusion("", rescale_learned_sigmas=True), x_start, noise, t_full, output)
    torch.testing.assert_close(full["loss"], full_rescaled["loss"])


def test_kl_loss_is_the_full_bound():
    """use_kl: loss = T * vb, with gradients to the prediction channels as well."""
    x_start, noise, t, eps, v = _batch([0, 1, 10, 250, 600, 999], seed=4)
    output = torch.cat([eps, v], dim=1).requires_grad_(True)
    _, mse_terms = _losses(create_diffusion(""), x_start, noise, t, output)
    _, kl_terms = _losses(create_diffusion("", use_kl=True), x_start, noise, t, output)
    assert set(kl_terms) == {"loss"}
    torch.testing.assert_close(kl_terms["loss"], 1000 * mse_terms["vb"])
    (grad,) = torch.autograd.grad(kl_terms["loss"].sum(), output)
    assert grad[:, :3].abs().sum() > 0


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_fixed_variance_is_plain_mse(predict_xstart):
    diffusion = create_diffusion("", learn_sigma=False, predict_xstart=predict_xstart)
    x_start, noise, t, eps, _ = _batch([0, 1, 10, 250, 600, 999], seed=5)
    _, terms = _losses(diffusion, x_start, noise, t, eps)
    target = x_start if predict_xstart else noise
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], ((target - eps) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="shape"):
        diffusion.training_losses_from_output(torch.cat([eps, eps], dim=1), x_start, x_start, t, noise)


def test_training_losses_calls_model_at_x_t():
    """training_losses(model, ...) = training_losses_from_output(model(x_t, t_original), ...)."""
    diffusion = create_diffusion("250")
    weight = torch.randn(6, 3, 1, 1)

    def model(x, t, scale):
        out = torch.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x) * scale
        return out + (t.float() / 1000).view(-1, 1, 1, 1)

    x_start, noise, t, _, _ = _batch([0, 1, 5, 100, 200, 249], seed=6)
    terms = diffusion.training_losses(model, x_start, t, model_kwargs={"scale": 0.5}, noise=noise)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    original_t = torch.tensor(diffusion.timestep_map)[t]
    expected = diffusion.training_losses_from_output(model(x_t, original_t, 0.5), x_start, x_t, t, noise)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(terms[key], expected[key])
