"""Discrete-time Gaussian diffusion (DDPM) with a learned-range variance, as used by DiT.

Forward process, for steps t = 0 .. T-1 with noise levels beta_t:
    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t)
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, 1 - abar_t),     abar_t = prod_{s <= t} (1 - beta_s)
Posterior (Bayes on the two Gaussians above), with abar_{-1} = 1:
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, btilde_t)
    c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)
    btilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
btilde_0 = 0, so its log is "clipped": log btilde_0 is replaced by log btilde_1.

Reverse process p(x_{t-1} | x_t) = N(mu, sigma^2). The model predicts epsilon (or x_0); x_0 is
recovered as x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps, and mu is the posterior mean at
that x_0. With the learned-range variance the model also outputs v (the second half of its
channels) and log sigma^2 = frac log beta_t + (1 - frac) log btilde_t (clipped), frac = (v + 1) / 2;
v = -1 gives btilde_t, v = 1 gives beta_t.

Training loss (DiT): MSE between the true and predicted epsilon plus, with a learned variance,
the variational-bound term in bits per dimension computed with the predicted mean detached, so
that the bound trains only the variance: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0
and the discretised-Gaussian decoder NLL -log p(x_0 | x_1) at t = 0.

Schedules are float64 numpy arrays of length T; they are read at integer steps by
``_extract_into_tensor`` and cast to float32, exactly as DiT does, so sampling and losses match
DiT's numbers. Each schedule is copied to a device once (``GaussianDiffusion._at``): DiT uploads it
at every read, a blocking host-to-device copy several times per training or sampling step.
"""

import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """What the first C output channels of the model predict."""

    START_X = enum.auto()
    EPSILON = enum.auto()


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen.

    FIXED_SMALL: btilde_t (log clipped at t = 0); FIXED_LARGE: beta_t (btilde_1 at t = 0);
    LEARNED_RANGE: the model's extra C channels interpolate the log variance between the two.
    """

    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """MSE (+ VB for a learned variance), MSE with the VB term scaled by T / 1000, or the VB alone
    (RESCALED_KL multiplies it by T to estimate the whole bound)."""

    MSE = enum.auto()
    RESCALED_MSE = enum.auto()
    KL = enum.auto()
    RESCALED_KL = enum.auto()


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Float64 betas, shape (num_diffusion_timesteps,).

    "linear": linspace(1e-4 * scale, 0.02 * scale) with scale = 1000 / num_diffusion_timesteps,
    so that any number of steps approximates the 1000-step schedule of DDPM.
    "squaredcos_cap_v2": beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) with
    abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 (improved DDPM's cosine schedule).
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = num_diffusion_timesteps
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
                        dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule_name!r} (expected 'linear' or 'squaredcos_cap_v2')")


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Read a float64 schedule at integer steps and broadcast it.

    arr: (T,) float64 numpy array, or tensor on the device of timesteps; timesteps: (N,) long
    tensor; broadcast_shape: (N, ...).
    Returns a float32 tensor of shape broadcast_shape on the device of timesteps, constant over
    every dimension but the first.
    """
    res = torch.as_tensor(arr, device=timesteps.device)[timesteps].float()
    res = res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim))
    return res.expand(broadcast_shape)


class GaussianDiffusion:
    """DDPM utilities for training and sampling.

    betas: 1-D float64 array of length T >= 2 with values in (0, 1].
    Every tensor argument x, x_start, x_t, noise has shape (N, C, ...); t is a long tensor (N,) of
    step indices in 0 .. T-1 of this (possibly respaced) process.
    A model is called as ``model(x_t, t, **model_kwargs)`` and returns (N, C, ...) or, with the
    learned-range variance, (N, 2C, ...).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        self.large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.log_large_variance = np.log(self.large_variance)
        self._fixed_variance = {  # names of (variance, log variance)
            ModelVarType.FIXED_LARGE: ("large_variance", "log_large_variance"),
            ModelVarType.FIXED_SMALL: ("posterior_variance", "posterior_log_variance_clipped"),
        }
        self.log_betas = np.log(betas)
        self._on_device = {}

    def _to_device(self, name, device):
        """The schedule attribute `name` as a tensor on `device`, copied there on first use only."""
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = torch.as_tensor(getattr(self, name), device=device)
        return self._on_device[key]

    def _at(self, name, t, shape):
        """The schedule attribute `name` read at steps t (N,), broadcast to shape (N, ...), float32."""
        return _extract_into_tensor(self._to_device(name, t.device), t, shape)

    def _wrap_model(self, model):
        """The callable that receives this process's step indices (SpacedDiffusion maps them)."""
        return model

    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0): (mean, variance, log_variance), each (N, C, ...)."""
        mean = self._at("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._at("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._at("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (noise ~ randn_like(x_start) if None)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._at("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._at("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log variance), each (N, C, ...)."""
        mean = (self._at("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._at("posterior_mean_coef2", t, x_t.shape) * x_t)
        variance = self._at("posterior_variance", t, x_t.shape)
        log_variance = self._at("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._at("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._at("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._at("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def _output_mean_variance(self, model_output, x, t, clip_denoised, denoised_fn):
        """p(x_{t-1} | x_t) from a model output (N, C or 2C, ...) at x = x_t (N, C, ...)."""
        channels = x.shape[1]
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            expected = (x.shape[0], 2 * channels, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(f"model output has shape {tuple(model_output.shape)}, expected {expected} "
                                 "(prediction and variance channels)")
            model_output, var_values = torch.split(model_output, channels, dim=1)
            min_log = self._at("posterior_log_variance_clipped", t, x.shape)
            max_log = self._at("log_betas", t, x.shape)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(f"model output has shape {tuple(model_output.shape)}, expected {tuple(x.shape)}")
            variance_name, log_variance_name = self._fixed_variance[self.model_var_type]
            variance = self._at(variance_name, t, x.shape)
            log_variance = self._at(log_variance_name, t, x.shape)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        else:
            pred_xstart = model_output
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None):
        """Call the model at (x_t, t) and return p(x_{t-1} | x_t).

        Returns a dict of (N, C, ...) tensors: mean, variance, log_variance, pred_xstart (after
        denoised_fn, then clamped to [-1, 1] if clip_denoised).
        """
        model_output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
        return self._output_mean_variance(model_output, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None, step_noise=None):
        """One ancestral step x_t -> x_{t-1} = mean + sigma * noise (no noise where t == 0).

        The model is called first; then noise = step_noise(torch.empty_like(x)) if given (step_noise
        fills its argument and returns it), else torch.randn_like(x) (drawn at t == 0 too).
        Returns dict(sample, pred_xstart), each (N, C, ...).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = step_noise(torch.empty_like(x)) if step_noise is not None else torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None, eta=0.0,
                    step_noise=None):
        """One DDIM step x_t -> x_{t-1}:
        x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma noise, with
        sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}) and eps
        re-derived from the (possibly clipped) x0. Noise is drawn after the model call, as in
        p_sample. Returns dict(sample, pred_xstart).
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._at("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._at("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = step_noise(torch.empty_like(x)) if step_noise is not None else torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _sample_loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Run step(model, x, t, **step_kwargs) for t = T-1 .. 0 under no_grad; return the final x."""
        if device is None:
            device = noise.device if noise is not None else next(model.parameters()).device
        x = noise if noise is not None else torch.randn(*shape, device=device)
        # Row k of step_rows is step T-1-k for every sample: made once, so a step allocates no index of its own.
        step_rows = torch.arange(self.num_timesteps - 1, -1, -1, device=device).unsqueeze(1).repeat(1, shape[0])
        for t in tqdm(step_rows) if progress else step_rows:
            with torch.no_grad():
                x = step(model, x, t, **step_kwargs)["sample"]
        return x

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, step_noise=None):
        """Ancestral sampling from x_T = noise (or torch.randn(*shape, device=device)) down to x_0.

        shape: (N, C, ...). device defaults to noise's device, else the model's first parameter's.
        step_noise: optional callable that fills a tensor like x with the per-step noise in place
        of torch.randn_like(x) and returns it (e.g. one torch.Generator per sample).
        Returns x_0, shape (N, C, ...).
        """
        return self._sample_loop(self.p_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                                 denoised_fn=denoised_fn, model_kwargs=model_kwargs, step_noise=step_noise)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, step_noise=None):
        """DDIM sampling (eta = 0: deterministic given x_T); arguments as p_sample_loop."""
        return self._sample_loop(self.ddim_sample, model, shape, noise, device, progress, clip_denoised=clip_denoised,
                                 denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta, step_noise=step_noise)

    def _vb_terms_bpd(self, model_output, x_start, x_t, t):
        """Variational-bound term (N,) in bits per dimension for a model output at (x_t, t)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self._output_mean_variance(model_output, x_t, t, clip_denoised=False, denoised_fn=None)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                            log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses_from_output(self, model_output, x_start, x_t, t, noise):
        """Per-sample losses from a model output already computed at (x_t, t).

        model_output: (N, C or 2C, ...); x_start, x_t, noise: (N, C, ...) with
        x_t = q_sample(x_start, t, noise); t: (N,). Returns a dict of (N,) tensors:
        - MSE / RESCALED_MSE: mse = mean_flat((target - prediction)^2), target = noise (EPSILON) or
          x_start (START_X); with the learned variance also vb = the bound term in bits/dim with the
          predicted mean detached (x T/1000 for RESCALED_MSE) and loss = mse + vb, else loss = mse.
        - KL / RESCALED_KL: loss = the bound term, gradients through the whole output (x T for
          RESCALED_KL).
        """
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            loss = self._vb_terms_bpd(model_output, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}

        terms = {}
        prediction = model_output
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            prediction, var_values = torch.split(model_output, x_t.shape[1], dim=1)
            frozen_out = torch.cat([prediction.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen_out, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        if prediction.shape != target.shape:
            raise ValueError(f"prediction has shape {tuple(prediction.shape)}, expected {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Draw x_t (noise = randn_like(x_start) if None), call the model, and return
        training_losses_from_output's dict."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self._wrap_model(model)(x_t, t, **(model_kwargs or {}))
        return self.training_losses_from_output(model_output, x_start, x_t, t, noise)
