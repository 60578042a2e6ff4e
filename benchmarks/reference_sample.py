"""The released SiT/SRA Euler-Maruyama sampler, rebuilt for side-by-side timing.

Same mathematics as SiT-SRA/samplers.py `euler_maruyama_sampler`, spent the way the
released loop spends it: the model in the latents' dtype (float32, no autocast), a time vector
and the interpolant's coefficients built as device tensors at every step, the score computed on
the whole [x; x] batch before the halves are mixed, and the step noise drawn with
`torch.randn_like` on the device.

Import it with SiT-SRA/ on sys.path (it uses that tree's `path.interpolant`).
"""
import torch

from path import interpolant


@torch.no_grad()
def reference_sde_sampler(model, latents, y, num_steps=250, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                          path_type="linear", null_class=1000, step_noise=torch.randn_like):
    """latents: (N, C, H, W) noise in the model's dtype; y: (N,) labels; model(x, t, y) -> velocity.

    step_noise(x) -> noise like x (float64), drawn before each stochastic step's model call.
    Returns the samples (N, C, H, W) float64.
    """
    dtype = latents.dtype
    t_steps = torch.cat([torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])
    y_null = torch.full_like(y, null_class)
    x = latents.to(torch.float64)

    def drift(x, t_cur):
        guided = cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high
        x_in = torch.cat([x, x]) if guided else x
        y_in = torch.cat([y, y_null]) if guided else y
        t_in = torch.ones(x_in.shape[0], device=x.device, dtype=torch.float64) * t_cur
        v = model(x_in.to(dtype), t_in.to(dtype), y_in).to(torch.float64)
        alpha, sigma, d_alpha, d_sigma = interpolant(t_in.view(-1, 1, 1, 1), path_type)
        ratio = alpha / d_alpha
        score = (ratio * v - x_in) / (sigma ** 2 - ratio * d_sigma * sigma)
        d = v - 0.5 * (2 * t_in.view(-1, 1, 1, 1)) * score
        if guided:
            cond, uncond = d.chunk(2)
            d = uncond + cfg_scale * (cond - uncond)
        return d

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        eps = step_noise(x)
        x = x + drift(x, t_cur) * dt + torch.sqrt(2 * t_cur) * eps * torch.sqrt(torch.abs(dt))
    return x + drift(x, t_steps[-2]) * (t_steps[-1] - t_steps[-2])
