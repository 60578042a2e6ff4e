"""Gaussian log-likelihood helpers for the diffusion variational bound.

- ``normal_kl``: KL(N(m1, e^{l1}) || N(m2, e^{l2})) element-wise, in nats:
  ``0.5 * (-1 + l2 - l1 + e^{l1 - l2} + (m1 - m2)^2 e^{-l2})``.
- ``approx_standard_normal_cdf``: the tanh approximation of the standard normal CDF used by
  ADM / improved DDPM, ``Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
- ``discretized_gaussian_log_likelihood``: log-probability that a Gaussian N(mean, e^{2 log_scale})
  puts on the 8-bit bin of a value x in [-1, 1]. The 256 values -1 + 2k/255 are bin centres and
  each bin spans +-1/255 around its centre; the first bin extends to -inf and the last to +inf
  (x < -0.999 or x > 0.999), so the 256 probabilities sum to one. Each probability is clamped to
  1e-12 before the log.
- ``mean_flat``: mean over every dimension but the first (batch) one.
"""

import math

import torch


def mean_flat(tensor):
    """(N, ...) -> (N,): mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Element-wise KL divergence (nats) between N(mean1, exp(logvar1)) and N(mean2, exp(logvar2)).

    All four arguments are tensors broadcastable to one shape; the result has that shape.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Tanh approximation of the standard normal CDF, element-wise (any shape)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood (nats) of 8-bit data x in [-1, 1] under a discretised Gaussian.

    x, means, log_scales: tensors of one shape (N, ...); returns log-probabilities of that shape.
    The bin of x is [x - 1/255, x + 1/255]; bins at the edges (|x| > 0.999) are open-ended.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
