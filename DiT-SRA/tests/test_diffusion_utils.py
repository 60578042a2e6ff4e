"""KL divergence, normal-CDF approximation and the discretised Gaussian decoder likelihood."""

import math

import pytest
import torch
from diffusion.diffusion_utils import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from scipy.stats import norm


def test_normal_kl_identical_is_zero():
    mean, logvar = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    assert torch.allclose(normal_kl(mean, logvar, mean, logvar), torch.zeros(4, 3, 5), atol=1e-6)


def test_normal_kl_closed_form():
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2."""
    m1, s1, m2, s2 = 0.3, 0.5, -1.2, 2.0
    expected = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    kl = normal_kl(torch.tensor([m1]), torch.tensor([2 * math.log(s1)]), torch.tensor([m2]),
                   torch.tensor([2 * math.log(s2)]))
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    assert expected > 0.5


def test_approx_cdf_close_to_exact():
    """The tanh approximation is within 2e-4 of the exact standard normal CDF."""
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - torch.from_numpy(norm.cdf(x.numpy()))).abs().max().item()
    assert err < 2e-4


@pytest.mark.parametrize("mean", [-1.0, -0.4, 0.0, 0.73, 1.3])
@pytest.mark.parametrize("scale", [1e-3, 0.02, 0.3, 2.0])
def test_discretized_likelihood_sums_to_one(mean, scale):
    """exp(log-likelihood) over the 256 bin centres -1 + 2k/255 sums to 1 within 1e-4 (float32):
    the bins tile the real line, the edge bins being open-ended."""
    x = (-1 + 2 * torch.arange(256) / 255).float()
    logp = discretized_gaussian_log_likelihood(x, means=torch.full_like(x, mean),
                                               log_scales=torch.full_like(x, math.log(scale)))
    assert logp.shape == x.shape
    assert abs(logp.exp().sum().item() - 1) < 1e-4


def test_discretized_likelihood_bin_masses():
    """Interior bin: Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s); edge bins: the tails.
    Exact normal CDF here, so the tolerance (5e-4) covers the tanh approximation."""
    m, s = 0.1, 0.05
    x = torch.tensor([-1.0, 0.1 + 2 / 255, 1.0 - 2 / 255, 1.0, 0.0])
    logp = discretized_gaussian_log_likelihood(x, means=torch.full_like(x, m), log_scales=torch.full_like(x, math.log(s)))
    xs = x.double().numpy()
    expected = norm.cdf((xs + 1 / 255 - m) / s) - norm.cdf((xs - 1 / 255 - m) / s)
    expected[0] = norm.cdf((-1 + 1 / 255 - m) / s)
    expected[3] = 1 - norm.cdf((1 - 1 / 255 - m) / s)
    assert torch.allclose(logp.exp().double(), torch.from_numpy(expected), atol=5e-4)
    # probabilities below 1e-12 are clamped before the log
    assert logp[0].item() == pytest.approx(math.log(1e-12), rel=1e-5)


def test_discretized_likelihood_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes"):
        discretized_gaussian_log_likelihood(torch.zeros(3), means=torch.zeros(3), log_scales=torch.zeros(1))


def test_mean_flat():
    x = torch.arange(24.0).view(2, 3, 4)
    torch.testing.assert_close(mean_flat(x), torch.tensor([5.5, 17.5]))
