"""Samplers for SiT velocity models: Euler / Heun ODE and Euler-Maruyama SDE, with classifier-free guidance.

Time runs from t = 1 (noise) to t = 0 (data) along the interpolant x_t = alpha(t) x0 + sigma(t) eps
of `path.interpolant`; the model predicts the velocity v(x, t, y) = E[d_alpha x0 + d_sigma eps | x_t = x].

ODE (probability flow), `euler_sampler`: dx = v dt on the grid t_i = linspace(1, 0, num_steps + 1),
    x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i),
optionally with a Heun correction on every step but the last:
    x_{i+1} = x_i + (t_{i+1} - t_i) (v(x_i, t_i) + v(x'_{i+1}, t_{i+1})) / 2,  x'_{i+1} the Euler step.

SDE (reverse-time), `euler_maruyama_sampler`: with diffusion g(t) = 2 t and the score recovered from the velocity
    s(x, t) = (alpha / d_alpha * v - x) / (sigma^2 - alpha / d_alpha * d_sigma * sigma),
the drift is d = v - g s / 2 and each step on the grid linspace(1, 0.04, num_steps), 0 is
    x_{i+1} = x_i + d(x_i, t_i) dt + sqrt(g(t_i)) sqrt(|dt|) eps_i,   dt = t_{i+1} - t_i < 0,
except the last step 0.04 -> 0, which returns the mean x_i + d dt without noise.

Classifier-free guidance: when cfg_scale > 1 and guidance_low <= t_i <= guidance_high, the model is called once on
[x; x] with labels [y; null] and the guided value is uncond + cfg_scale * (cond - uncond) (on v for the ODE, on d for
the SDE). A Heun correction uses the guidance decision of its step's t_i, as the released code does.

Integration runs in float64; the model sees x and t in the latents' dtype, its output is cast back to float64.
Both samplers reproduce the behaviour of the REPA / SRA released samplers, including the order of random draws.
"""
import math

import torch
from path import interpolant


def _time_rows(t_steps, rows, device, dtype):
    """The model's time input for every grid point: (len(t_steps), rows) in the model dtype; row i is t_steps[i]."""
    return t_steps.to(device=device, dtype=dtype).unsqueeze(1).repeat(1, rows)


def _labels(y, cfg_scale, null_class):
    """Labels for both call shapes: y (N,) without guidance, [y; null] (2N,) when cfg_scale > 1; y is its first half."""
    if cfg_scale > 1.0:
        return torch.cat([y, torch.full_like(y, null_class)])
    return y


def _input_buffer(latents, cfg_scale):
    """The model's input rows, (2N, C, H, W) when cfg_scale > 1 else (N, C, H, W), in the latents' dtype: allocated
    once per sampling run and rewritten at every call, so the calls see one tensor of one shape (see _velocity)."""
    rows = 2 * latents.shape[0] if cfg_scale > 1.0 else latents.shape[0]
    return latents.new_empty((rows, *latents.shape[1:]))


def _velocity(model, x, x_in, t_row, y_in, guided):
    """Calls the model once; returns its float64 output split into (cond, uncond) halves if guided, else (v,).

    x: (N, C, H, W) float64 state; x_in: _input_buffer's (>= 2N if guided, else >= N) rows, into which x is cast (twice
    if guided: [x; x]); t_row: (>= 2N,) times in the model dtype; y_in: labels (y, or [y; null]).
    """
    n = x.shape[0]
    rows = 2 * n if guided else n
    x_in[:n].copy_(x)
    if guided:
        x_in[n:rows].copy_(x_in[:n])
    out = model(x_in[:rows], t_row[:rows], y_in[:rows]).to(torch.float64)
    return out.chunk(2) if guided else (out,)


def _guide(values, cfg_scale):
    """uncond + cfg_scale * (cond - uncond) for (cond, uncond); the single value itself for (value,)."""
    if len(values) == 1:
        return values[0]
    cond, uncond = values
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                  path_type="linear", null_class=1000, step_noise=None):
    """Deterministic Euler (or Heun) integration of the probability-flow ODE from t = 1 to t = 0.

    model: callable model(x (M, C, H, W), t (M,), y (M,) long) -> velocity (M, C, H, W), x and t in latents.dtype.
    latents: (N, C, H, W) initial noise; its dtype is the dtype the model is called in.
    y: (N,) long class labels; null_class is the label of the unconditional branch.
    num_steps: number of steps (model calls without Heun; 2 * num_steps - 1 with Heun).
    cfg_scale, guidance_low, guidance_high: guidance (see the module docstring).
    path_type, step_noise: accepted for a signature shared with euler_maruyama_sampler; unused by the ODE.
    Returns the samples x_0, (N, C, H, W) float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    t_model = _time_rows(t_steps, 2 * latents.shape[0], latents.device, dtype)
    y_in = _labels(y, cfg_scale, null_class)
    x_in = _input_buffer(latents, cfg_scale)
    t_list = t_steps.tolist()
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_list[i], t_list[i + 1]
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        v = _guide(_velocity(model, x, x_in, t_model[i], y_in, guided), cfg_scale)
        x_next = x + (t_next - t_cur) * v
        if heun and i < num_steps - 1:
            v_next = _guide(_velocity(model, x_next, x_in, t_model[i + 1], y_in, guided), cfg_scale)
            x_next = x + (t_next - t_cur) * (0.5 * v + 0.5 * v_next)
        x = x_next
    return x


@torch.no_grad()
def euler_maruyama_sampler(model, latents, y, num_steps=250, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear", null_class=1000, step_noise=None):
    """Euler-Maruyama integration of the reverse SDE with diffusion g(t) = 2t from t = 1 to t = 0.

    model, latents, y, cfg_scale, guidance_low, guidance_high, null_class: as in euler_sampler.
    num_steps: number of steps (and model calls): num_steps - 1 stochastic steps on linspace(1, 0.04, num_steps),
        then a noise-free step 0.04 -> 0.
    path_type: "linear" or "cosine", the interpolant the model was trained with (needed for the score).
    step_noise: optional callable step_noise(x) -> noise shaped like x (float64), used instead of
        torch.randn_like(x); called once per stochastic step, before that step's model call.
    heun: accepted for a signature shared with euler_sampler; unused.
    Returns the samples x_0, (N, C, H, W) float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dtype = latents.dtype
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    t_model = _time_rows(t_steps, 2 * latents.shape[0], latents.device, dtype)
    y_in = _labels(y, cfg_scale, null_class)
    x_in = _input_buffer(latents, cfg_scale)
    # Score coefficients, s = (ratio * v - x) / var, at every time a step starts from.
    alpha, sigma, d_alpha, d_sigma = interpolant(t_steps[:-1], path_type)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    t_list, ratio_list, var_list = t_steps.tolist(), ratio.tolist(), var.tolist()
    draw = step_noise if step_noise is not None else torch.randn_like
    x = latents.to(torch.float64)

    def drift(i, x):
        """The (guided) drift d = v - g s / 2 at (x, t_i), float64 (N, C, H, W)."""
        t_cur = t_list[i]
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        half_g = 0.5 * (2 * t_cur)
        vs = _velocity(model, x, x_in, t_model[i], y_in, guided)
        return _guide([v - half_g * ((ratio_list[i] * v - x) / var_list[i]) for v in vs], cfg_scale)

    for i in range(num_steps - 1):
        dt = t_list[i + 1] - t_list[i]
        eps = draw(x)  # drawn before the model call, as in the released sampler
        x = x + drift(i, x) * dt + math.sqrt(2 * t_list[i]) * (eps * math.sqrt(abs(dt)))
    return x + drift(num_steps - 1, x) * (t_list[-1] - t_list[-2])
