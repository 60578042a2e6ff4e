"""The interpolant x_t = alpha(t) x0 + sigma(t) noise, defined once for the loss and the samplers.

t = 0 is data, t = 1 is noise. The velocity target is d/dt x_t = d_alpha x0 + d_sigma noise.
"""
import math

import torch

PATH_TYPES = ("linear", "cosine")


def interpolant(t, path_type="linear"):
    """Returns (alpha, sigma, d_alpha, d_sigma) at time t (a tensor or a float), same shape as t."""
    if path_type == "linear":
        t = torch.as_tensor(t)
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        t = torch.as_tensor(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t))
    raise ValueError(f"unknown path type {path_type!r}: use one of {PATH_TYPES}")
