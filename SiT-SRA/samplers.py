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
The loops allocate nothing per step: their buffers are made once per call, and the float64 arithmetic runs in place,
operation by operation as the formulas above write it (so its numbers are those of the plain expressions).
Both samplers reproduce the behaviour of the REPA / SRA released samplers, including the order of random draws.
"""
import math

import torch
from path import interpolant


class _Velocity:
    """The model at fixed shapes for one sampling run, with every buffer of the loop allocated once.

    Its input x_in, times t_in, labels y_in and float64 output are made here and rewritten at every call, so the
    loop allocates nothing per step and the model (compiled or not) sees one tensor of each of at most two shapes:
    N rows, and 2N rows [x; x] with labels [y; null] on a guided step.
    """

    def __init__(self, model, latents, y, t_steps, cfg_scale, guidance_low, guidance_high, null_class):
        self.model, self.n, self.cfg_scale = model, latents.shape[0], cfg_scale
        guides = cfg_scale > 1.0
        rows = 2 * self.n if guides else self.n
        self.x_in = latents.new_empty((rows, *latents.shape[1:]))
        self.t_in = t_steps.to(device=latents.device, dtype=latents.dtype).unsqueeze(1).repeat(1, rows)
        self.y_in = torch.cat([y, torch.full_like(y, null_class)]) if guides else y
        self.out = torch.empty(self.x_in.shape, dtype=torch.float64, device=latents.device)
        self.guided = [guides and guidance_low <= t <= guidance_high for t in t_steps.tolist()]

    def __call__(self, x, i, guided=None):
        """The model's float64 output at (x, t_steps[i]) as a (k, N, C, H, W) view of the output buffer: k = 2, the
        (cond, uncond) halves, if guided (by default step i's guidance decision), else k = 1.
        x: (N, C, H, W) float64, cast into x_in (twice if guided)."""
        n = self.n
        guided = self.guided[i] if guided is None else guided
        rows = 2 * n if guided else n
        self.x_in[:n].copy_(x)
        if guided:
            self.x_in[n:rows].copy_(self.x_in[:n])
        out = self.out[:rows]
        out.copy_(self.model(self.x_in[:rows], self.t_in[i, :rows], self.y_in[:rows]))
        return out.view(-1, *x.shape)

    def guide(self, values):
        """values (k, N, C, H, W) -> (N, C, H, W): for k = 2, uncond + cfg_scale (cond - uncond), written over cond;
        for k = 1, the value itself."""
        if len(values) == 2:
            cond, uncond = values
            cond.sub_(uncond).mul_(self.cfg_scale).add_(uncond)
        return values[0]


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
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    velocity = _Velocity(model, latents, y, t_steps, cfg_scale, guidance_low, guidance_high, null_class)
    t_list = t_steps.tolist()
    x = latents.to(torch.float64, copy=True)
    x_next = torch.empty_like(x)
    half_v = torch.empty_like(x) if heun else None
    for i in range(num_steps):
        dt = t_list[i + 1] - t_list[i]
        v = velocity.guide(velocity(x, i))
        torch.mul(v, dt, out=x_next).add_(x)  # the Euler step x + dt v
        if heun and i < num_steps - 1:
            torch.mul(v, 0.5, out=half_v)
            v_next = velocity.guide(velocity(x_next, i + 1, guided=velocity.guided[i]))
            half_v.add_(v_next.mul_(0.5)).mul_(dt)
            torch.add(x, half_v, out=x_next)  # x + dt (v / 2 + v_next / 2)
        x, x_next = x_next, x
    return x


@torch.no_grad()
def euler_maruyama_sampler(model, latents, y, num_steps=250, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear", null_class=1000, step_noise=None):
    """Euler-Maruyama integration of the reverse SDE with diffusion g(t) = 2t from t = 1 to t = 0.

    model, latents, y, cfg_scale, guidance_low, guidance_high, null_class: as in euler_sampler.
    num_steps: number of steps (and model calls): num_steps - 1 stochastic steps on linspace(1, 0.04, num_steps),
        then a noise-free step 0.04 -> 0.
    path_type: "linear" or "cosine", the interpolant the model was trained with (needed for the score).
    step_noise: optional callable step_noise(eps) that fills eps, (N, C, H, W) float64, with the step's noise in
        place of eps.normal_() (the global generator's torch.randn_like draws); called once per stochastic step,
        before that step's model call.
    heun: accepted for a signature shared with euler_sampler; unused.
    Returns the samples x_0, (N, C, H, W) float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    velocity = _Velocity(model, latents, y, t_steps, cfg_scale, guidance_low, guidance_high, null_class)
    # Score coefficients, s = (ratio * v - x) / var, at every time a step starts from.
    alpha, sigma, d_alpha, d_sigma = interpolant(t_steps[:-1], path_type)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    t_list, ratio_list, var_list = t_steps.tolist(), ratio.tolist(), var.tolist()
    draw = step_noise if step_noise is not None else torch.Tensor.normal_
    x = latents.to(torch.float64, copy=True)
    eps, score_term = torch.empty_like(x), torch.empty_like(velocity.out)

    def drift_step(i):
        """The (guided) drift d = v - g s / 2 at (x, t_i), times dt = t_{i+1} - t_i: (N, C, H, W) float64, a view of
        the model's output buffer."""
        t_cur = t_list[i]
        vs = velocity(x, i)
        half_g_s = score_term[:vs.shape[0] * velocity.n].view_as(vs)
        torch.mul(vs, ratio_list[i], out=half_g_s).sub_(x).div_(var_list[i]).mul_(0.5 * (2 * t_cur))
        return velocity.guide(vs.sub_(half_g_s)).mul_(t_list[i + 1] - t_cur)

    for i in range(num_steps - 1):
        draw(eps)  # before the model call, as in the released sampler
        x.add_(drift_step(i)).add_(eps.mul_(math.sqrt(abs(t_list[i + 1] - t_list[i]))).mul_(math.sqrt(2 * t_list[i])))
    return x.add_(drift_step(num_steps - 1))
