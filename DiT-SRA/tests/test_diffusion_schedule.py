"""Noise schedules, forward process q(x_t | x_0) and posterior q(x_{t-1} | x_t, x_0) against closed
forms computed here in float64 from the definition of the schedule."""

import math

import numpy as np
import pytest
import torch
from diffusion import create_diffusion
from diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, _extract_into_tensor


def _reference_linear_betas(steps=1000):
    """beta_t = scale * (1e-4 + (0.02 - 1e-4) t / (steps - 1)), scale = 1000 / steps."""
    scale = 1000 / steps
    return np.array([scale * (1e-4 + (0.02 - 1e-4) * t / (steps - 1)) for t in range(steps)])


def _reference_alpha_bar(betas):
    out, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


def _plain_diffusion(steps=1000):
    return GaussianDiffusion(betas=_reference_linear_betas(steps), model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)


@pytest.mark.parametrize("steps", [1000, 250])
def test_linear_schedule_matches_formula(steps):
    diffusion = create_diffusion("", diffusion_steps=steps)
    betas = _reference_linear_betas(steps)
    acp = _reference_alpha_bar(betas)
    assert diffusion.num_timesteps == steps
    assert diffusion.betas.dtype == np.float64
    # create_diffusion re-derives betas from alpha-bar (respacing with every step kept): rounding only.
    np.testing.assert_allclose(diffusion.betas, betas, rtol=1e-10)
    np.testing.assert_allclose(diffusion.alphas_cumprod, acp, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev, np.concatenate([[1.0], acp[:-1]]), rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod_next, np.concatenate([acp[1:], [0.0]]), rtol=1e-12)
    np.testing.assert_allclose(diffusion.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / acp - 1), rtol=1e-9)
    if steps == 1000:
        assert diffusion.betas[0] == pytest.approx(1e-4, rel=1e-9)
        assert diffusion.betas[-1] == pytest.approx(0.02, rel=1e-12)


def test_cosine_schedule_matches_formula():
    diffusion = create_diffusion("", noise_schedule="squaredcos_cap_v2", diffusion_steps=100)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [min(1 - f((i + 1) / 100) / f(i / 100), 0.999) for i in range(100)]
    np.testing.assert_allclose(diffusion.betas, expected, rtol=1e-8)
    with pytest.raises(ValueError, match="noise schedule"):
        create_diffusion("", noise_schedule="quadratic")


def test_q_mean_variance_closed_form():
    diffusion = _plain_diffusion()
    acp = _reference_alpha_bar(_reference_linear_betas())
    x0 = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 300, 700, 999])
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    a = torch.tensor(acp[t.numpy()]).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, (a.sqrt() * x0.double()).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, (1 - a).float().expand_as(x0), rtol=1e-6, atol=0)
    torch.testing.assert_close(log_var, torch.log(1 - a).float().expand_as(x0), rtol=1e-6, atol=0)
    assert mean.dtype == var.dtype == torch.float32


@pytest.mark.parametrize("step", [0, 100, 500, 999])
def test_q_sample_empirical_moments(step):
    """Mean sqrt(abar) x0 and variance 1 - abar over 200,000 noise draws for a fixed x0.
    Tolerance: 5 standard errors of the mean (sqrt((1-abar)/n)) and of the variance
    ((1-abar) sqrt(2/n))."""
    diffusion = _plain_diffusion()
    a = _reference_alpha_bar(_reference_linear_betas())[step]
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    t = torch.full((n,), step)
    xt = diffusion.q_sample(x0, t, noise=torch.randn(n, 1, generator=torch.Generator().manual_seed(step))).double()
    assert abs(xt.mean().item() - math.sqrt(a) * 0.7) < 5 * math.sqrt((1 - a) / n)
    assert abs(xt.var().item() - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / n)


def test_q_sample_uses_given_noise():
    diffusion = _plain_diffusion()
    acp = _reference_alpha_bar(_reference_linear_betas())
    x0, noise = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    t = torch.tensor([3, 900])
    a = torch.tensor(acp[[3, 900]]).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise=noise).double(), expected, rtol=1e-6, atol=1e-6)


def test_posterior_matches_bayes_product():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): as a function of
    x_{t-1} the first is N(x_t / sqrt(alpha_t), beta_t / alpha_t) and the second
    N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}); precisions add and means are precision-weighted."""
    diffusion = _plain_diffusion()
    betas = _reference_linear_betas()
    acp = _reference_alpha_bar(betas)
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    steps = [1, 2, 400, 999]
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, torch.tensor(steps))
    for i, s in enumerate(steps):
        alpha, prev = 1 - betas[s], acp[s - 1]
        prec_lik, prec_prior = alpha / betas[s], 1 / (1 - prev)
        post_var = 1 / (prec_lik + prec_prior)
        post_mean = post_var * (prec_lik * xt[i].double() / math.sqrt(alpha) + prec_prior * math.sqrt(prev) * x0[i].double())
        torch.testing.assert_close(mean[i].double(), post_mean, rtol=1e-5, atol=1e-5)
        assert torch.allclose(var[i].double(), torch.tensor(post_var, dtype=torch.float64), rtol=1e-5)
        assert torch.allclose(log_var[i].double(), torch.tensor(math.log(post_var), dtype=torch.float64), rtol=1e-5)
    np.testing.assert_allclose(diffusion.posterior_variance[1:],
                               [1 / (((1 - b) / b) + 1 / (1 - p)) for b, p in zip(betas[1:], acp[:-1])], rtol=1e-10)


def test_posterior_at_step_zero_and_clipping():
    """At t = 0 the posterior is a point mass at x_0; its log variance is clipped to log btilde_1."""
    diffusion = _plain_diffusion()
    x0, xt = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=1e-6, atol=1e-6)
    assert torch.all(var == 0)
    assert diffusion.posterior_variance[0] == 0
    assert diffusion.posterior_log_variance_clipped[0] == math.log(diffusion.posterior_variance[1])
    np.testing.assert_array_equal(diffusion.posterior_log_variance_clipped[1:], np.log(diffusion.posterior_variance[1:]))
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(diffusion.posterior_variance[1])))


def test_extract_into_tensor_float32_broadcast():
    arr = np.array([0.1, 0.2, 0.3], dtype=np.float64)
    out = _extract_into_tensor(arr, torch.tensor([2, 0]), (2, 3, 4))
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    assert torch.all(out[0] == torch.tensor(0.3, dtype=torch.float32))
    assert torch.all(out[1] == torch.tensor(0.1, dtype=torch.float32))


def test_invalid_betas_rejected():
    kwargs = dict(model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE,
                  loss_type=LossType.MSE)
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=[0.1], **kwargs)
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=[0.0, 0.1], **kwargs)


@pytest.mark.parametrize("respacing", ["", "250"])
def test_schedules_reach_a_device_once_and_read_as_dit_reads_them(respacing):
    """A training loss and a sampling step copy each schedule to the device on the first call only
    (later steps make no host-to-device copy) and read the same float32 values as DiT's per-call
    `torch.from_numpy(arr)[t].float()`."""
    diffusion = create_diffusion(timestep_respacing=respacing)
    x0, t = torch.randn(3, 4, 2, 2), torch.tensor([0, 5, diffusion.num_timesteps - 1])

    def model(x, steps):  # epsilon and variance channels, as DiT's learned-sigma output
        return torch.cat([x * 0.5, torch.tanh(x)], dim=1)

    diffusion.training_losses(model, x0, t)
    diffusion.p_sample(model, x0, t)
    copies = dict(diffusion._on_device)
    assert copies and all(v.device == x0.device for v in copies.values())
    diffusion.training_losses(model, x0, t)
    diffusion.p_sample(model, x0, t)
    assert diffusion._on_device.keys() == copies.keys()
    assert all(diffusion._on_device[k] is v for k, v in copies.items())
    for name in ("sqrt_alphas_cumprod", "posterior_mean_coef1", "log_betas", "posterior_log_variance_clipped"):
        expected = torch.from_numpy(getattr(diffusion, name))[t].float().view(3, 1, 1, 1).expand(3, 4, 2, 2)
        assert torch.equal(diffusion._at(name, t, x0.shape), expected)
