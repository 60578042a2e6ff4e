"""Tests of samplers.py with analytic velocity models whose exact flow is known in closed form.

Gaussian data x0 ~ N(m, s^2) per dimension, x_t = alpha x0 + sigma eps: x_t ~ N(alpha m, V), V = alpha^2 s^2 + sigma^2,
and by Gaussian conditioning E[x0 | x_t] = m + alpha s^2 (x_t - alpha m) / V, E[eps | x_t] = sigma (x_t - alpha m) / V, so
    v(x, t) = E[d_alpha x0 + d_sigma eps | x_t = x] = d_alpha m + (d_alpha alpha s^2 + d_sigma sigma) (x - alpha m) / V.
Along the probability-flow ODE, z = (x_t - alpha m) / sqrt(V) is constant, so the ODE maps noise z to m + s z.

Two-point data x0 = +-c (probability 1/2 each): E[x0 | x_t] = c tanh(alpha c x_t / sigma^2),
E[eps | x_t] = (x_t - alpha E[x0 | x_t]) / sigma. In 1-D the ODE map is monotone and odd, so it sends z to c sign(z).
"""
import math

import pytest
import torch
from path import interpolant
from samplers import euler_maruyama_sampler, euler_sampler
from sampling_io import RowGenerators, sample_seed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

N_SAMPLES = 20_000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are small; one intra-op thread avoids thread-pool stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _coefficients(t, x, path_type):
    """alpha, sigma, d_alpha, d_sigma at the model's times t (M,), float64, shaped to broadcast against x (M, ...)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return [c.view(shape) for c in interpolant(t.to(torch.float64), path_type)]


def gaussian_velocity(x, t, mean, std, path_type):
    """Exact E[v | x_t = x] for x0 ~ N(mean, std^2) per dimension; mean/std broadcast against x. Float64."""
    alpha, sigma, d_alpha, d_sigma = _coefficients(t, x, path_type)
    x = x.to(torch.float64)
    var = alpha ** 2 * std ** 2 + sigma ** 2
    return d_alpha * mean + (d_alpha * alpha * std ** 2 + d_sigma * sigma) * (x - alpha * mean) / var


def two_point_velocity(x, t, c, path_type):
    """Exact E[v | x_t = x] for x0 = +-c with probability 1/2 each (t < 1 ... t > 0, where sigma > 0). Float64."""
    alpha, sigma, d_alpha, d_sigma = _coefficients(t, x, path_type)
    x = x.to(torch.float64)
    x0_mean = c * torch.tanh(alpha * c * x / sigma ** 2)
    return d_alpha * x0_mean + d_sigma * (x - alpha * x0_mean) / sigma


class GaussianModel:
    """Per-dimension Gaussian data N(mean[c], std[c]^2) over channels c; ignores the label. Returns x's dtype."""

    def __init__(self, mean, std, path_type):
        self.mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.path_type = path_type

    def __call__(self, x, t, y):
        return gaussian_velocity(x, t, self.mean, self.std, self.path_type).to(x.dtype)


class ClassGaussianModel:
    """Class-conditional data N(means[y], std^2) (one channel); the null label gives the zero-mean N(0, std^2).

    With the same std for every label, uncond + w (cond - uncond) is exactly the velocity of N(w means[y], std^2).
    Records every call: rows, labels, times and input dtypes.
    """

    def __init__(self, means, std, null_class, path_type="linear"):
        self.means = torch.tensor(means, dtype=torch.float64)
        self.std = std
        self.null_class = null_class
        self.path_type = path_type
        self.calls = []

    def class_mean(self, y):
        is_null = y == self.null_class
        return torch.where(is_null, 0.0, self.means[y.masked_fill(is_null, 0)]).view(-1, 1, 1, 1)

    def __call__(self, x, t, y):
        self.calls.append(dict(rows=x.shape[0], y=y.clone(), t=t.clone(), x_dtype=x.dtype, t_dtype=t.dtype))
        return gaussian_velocity(x, t, self.class_mean(y), self.std, self.path_type).to(x.dtype)


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(n):
    return torch.arange(n) % 3


def _check_moments(out, mean, std, bias):
    """Per-channel sample mean within 5 standard errors + bias of mean; sample std within 5 standard errors + bias."""
    n = out.shape[0]
    for c, (m, s) in enumerate(zip(mean, std)):
        sample = out[:, c]
        assert abs(sample.mean().item() - m) <= 5 * s / math.sqrt(n) + bias * s, (c, sample.mean().item(), m)
        assert abs(sample.std().item() / s - 1) <= 5 / math.sqrt(2 * n) + bias, (c, sample.std().item(), s)


# ---------------------------------------------------------------------------------------------------------------
# Transport of N(0, I) to the data distribution


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("num_steps, heun, tol", [(200, False, 0.1), (100, True, 2e-3)])
def test_ode_maps_noise_to_gaussian_data(path_type, num_steps, heun, tol):
    """ODE: every sample lands at m + s z (Euler 200 steps: |err| < 0.1, O(1/steps); Heun 100 steps: < 2e-3)."""
    mean, std = [1.5, -0.5], [0.5, 2.0]
    model = GaussianModel(mean, std, path_type)
    z = _noise((N_SAMPLES, 2, 1, 1))
    out = euler_sampler(model, z, _labels(N_SAMPLES), num_steps=num_steps, heun=heun, path_type=path_type)
    exact = model.mean + model.std * z
    assert (out - exact).abs().max().item() < tol
    _check_moments(out, mean, std, bias=0.02)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("heun", [False, True])
def test_ode_maps_noise_to_two_point_mixture(path_type, heun):
    """ODE with 200 steps: z goes to c sign(z) within 1e-3 for every sample; about half the mass on each point."""
    c = 1.3
    z = _noise((N_SAMPLES, 1, 1, 1), seed=1)
    out = euler_sampler(lambda x, t, y: two_point_velocity(x, t, c, path_type).to(x.dtype), z,
                        _labels(N_SAMPLES), num_steps=200, heun=heun, path_type=path_type)
    assert (out - c * torch.sign(z)).abs().max().item() < 1e-3
    assert abs((out > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(N_SAMPLES)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_maps_noise_to_gaussian_data(path_type):
    """SDE with 250 steps, 20k samples: mean within 5 s.e. + 0.02 s, std within 5 s.e. + 3% (0.04 cutoff bias ~1%)."""
    mean, std = [1.5, -0.5], [0.5, 2.0]
    model = GaussianModel(mean, std, path_type)
    torch.manual_seed(0)
    z = torch.randn(N_SAMPLES, 2, 1, 1, dtype=torch.float64)
    out = euler_maruyama_sampler(model, z, _labels(N_SAMPLES), num_steps=250, path_type=path_type)
    _check_moments(out, mean, std, bias=0.03)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_maps_noise_to_two_point_mixture(path_type):
    """SDE with 250 steps: half the mass on each point, mean distance to the nearest point < 0.05 c."""
    c = 1.3
    torch.manual_seed(0)
    z = torch.randn(N_SAMPLES, 1, 1, 1, dtype=torch.float64)
    out = euler_maruyama_sampler(lambda x, t, y: two_point_velocity(x, t, c, path_type).to(x.dtype), z,
                                 _labels(N_SAMPLES), num_steps=250, path_type=path_type)
    assert abs((out > 0).double().mean().item() - 0.5) < 5 * 0.5 / math.sqrt(N_SAMPLES)
    assert (out.abs() - c).abs().mean().item() < 0.05 * c


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_cfg_scale_one_is_no_guidance(sampler):
    """cfg_scale 1: only the conditional batch (N rows, labels y), identical to a run whose guidance interval is empty."""
    n = 6
    z, y = _noise((n, 1, 2, 2)), _labels(n)
    runs = []
    for kwargs in (dict(cfg_scale=1.0), dict(cfg_scale=4.0, guidance_low=2.0, guidance_high=3.0)):
        model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=3)
        torch.manual_seed(0)
        runs.append(sampler(model, z, y, num_steps=10, null_class=3, **kwargs))
        assert all(call["rows"] == n and torch.equal(call["y"], y) for call in model.calls)
    assert torch.equal(runs[0], runs[1])


def _guided_ode_closed_form(z, class_mean, std, scale, t_high, t_low, path_type):
    """Exact flow: conditional N(m, s^2) for t > t_high and t < t_low, guided N(scale m, s^2) in between.

    Each Gaussian flow keeps z = (x_t - alpha m) / sqrt(V) constant and all share V(t), so at a switch time t
    the invariant changes by alpha(t) (m_before - m_after) / sqrt(V(t)).
    """
    def alpha_over_sqrt_var(t):
        alpha, sigma, _, _ = (float(c) for c in interpolant(torch.tensor(t, dtype=torch.float64), path_type))
        return alpha / math.sqrt(alpha ** 2 * std ** 2 + sigma ** 2)

    guided_mean = scale * class_mean
    z = z + alpha_over_sqrt_var(t_high) * (class_mean - guided_mean)
    z = z + alpha_over_sqrt_var(t_low) * (guided_mean - class_mean)
    return class_mean + std * z


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_guided_ode_matches_closed_form_and_batches(path_type):
    """Heun, 100 steps, cfg 2.5 on [0.305, 0.705] (the steps starting at t = 0.70 ... 0.31): samples match the
    closed-form piecewise flow within 2e-3; the model sees [x; x] with labels [y; null] and times [t; t] (2N rows)
    at every guided time and only the N conditional rows elsewhere."""
    n, null, scale = 9, 3, 2.5
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=null, path_type=path_type)
    z, y = _noise((n, 1, 1, 1)), _labels(n)
    out = euler_sampler(model, z, y, num_steps=100, heun=True, cfg_scale=scale, guidance_low=0.305,
                        guidance_high=0.705, path_type=path_type, null_class=null)
    expected = _guided_ode_closed_form(z, model.class_mean(y), 0.7, scale, 0.70, 0.30, path_type)
    assert (out - expected).abs().max().item() < 2e-3
    # Without guidance the same model would give a clearly different result (the test is sensitive to it).
    assert (expected - (model.class_mean(y) + 0.7 * z)).abs().max().item() > 0.1

    y_both = torch.cat([y, torch.full_like(y, null)])
    t_grid = torch.linspace(1, 0, 101, dtype=torch.float64)
    assert len(model.calls) == 2 * 100 - 1
    for k, call in enumerate(model.calls):
        # Call 2j is step j at t_j; call 2j + 1 its Heun correction at t_(j+1), guided iff t_j is in the interval.
        step, correction = divmod(k, 2)
        guided = 0.305 <= t_grid[step].item() <= 0.705
        assert call["rows"] == (2 * n if guided else n)
        assert torch.equal(call["y"], y_both if guided else y)
        assert torch.equal(call["t"], t_grid[step + correction].expand(call["rows"]))


def test_heun_correction_uses_its_step_guidance_decision():
    """As in the released code, a Heun correction at t_next is guided iff its step's t_cur is in the interval;
    both interval ends are inclusive."""
    n = 2
    t_grid = torch.linspace(1, 0, 11, dtype=torch.float64).tolist()
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=3)
    euler_sampler(model, _noise((n, 1, 1, 1)), _labels(n), num_steps=10, heun=True, cfg_scale=2.0,
                  guidance_low=t_grid[7], guidance_high=0.85, null_class=3)
    seen = [(call["rows"], round(call["t"][0].item(), 6)) for call in model.calls]
    # Steps from 1.0 and 0.9 are unguided (their corrections at 0.9 and 0.8 too); steps from 0.8 ... 0.3 are guided
    # (t_grid[7] = 0.3 is the low end itself), later steps are not.
    assert seen[:4] == [(n, 1.0), (n, 0.9), (n, 0.9), (n, 0.8)]
    assert seen[4:16] == [(2 * n, round(t_grid[j + k], 6)) for j in range(2, 8) for k in (0, 1)]
    assert seen[16:] == [(n, 0.2), (n, 0.1), (n, 0.1)]


def test_guided_sde_samples_guided_distribution():
    """SDE, cfg 2 on the whole path: samples of class y follow N(2 means[y], s^2) (5 s.e. + 3% as above)."""
    means, std, scale = [-2.0, 0.5, 3.0], 0.7, 2.0
    model = ClassGaussianModel(means, std, null_class=3)
    torch.manual_seed(0)
    y = _labels(3 * 6000)
    z = torch.randn(len(y), 1, 1, 1, dtype=torch.float64)
    out = euler_maruyama_sampler(model, z, y, num_steps=250, cfg_scale=scale, null_class=3)
    for label, m in enumerate(means):
        _check_moments(out[y == label], [scale * m], [std], bias=0.03)
    assert all(call["rows"] == 2 * len(y) for call in model.calls)


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_default_null_class_and_interval(sampler):
    """Default null label 1000; the default interval [0, 1] guides every call, t = 1 included."""
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=1000)
    sampler(model, _noise((2, 1, 1, 1)), _labels(2), num_steps=3, heun=True, cfg_scale=2.0)
    assert model.calls[0]["t"][0].item() == 1.0
    assert all(torch.equal(call["y"], torch.tensor([0, 1, 1000, 1000])) for call in model.calls)


# ---------------------------------------------------------------------------------------------------------------
# SDE noise: count, order, reproducibility


def test_sde_time_grid_noise_count_and_order():
    """num_steps model calls at linspace(1, 0.04, num_steps); num_steps - 1 draws, each before its step's model
    call; no draw for the last step (0.04 -> 0)."""
    num_steps, events = 7, []
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=3)

    def recording_model(x, t, y):
        events.append("model")
        return model(x, t, y)

    def step_noise(eps):
        events.append("noise")
        assert eps.dtype == torch.float64 and eps.shape == (3, 1, 1, 1)
        return eps.zero_()

    euler_maruyama_sampler(recording_model, _noise((3, 1, 1, 1)), _labels(3), num_steps=num_steps,
                           step_noise=step_noise)
    assert events == ["noise", "model"] * (num_steps - 1) + ["model"]
    times = torch.stack([call["t"][0] for call in model.calls])
    assert torch.equal(times, torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_steps_follow_the_spec_formulas(path_type):
    """Three steps (t = 1, 0.52, 0.04, 0) written out from the Euler-Maruyama update, guided on every step: g = 2t,
    s = (alpha/d_alpha v - x) / (sigma^2 - alpha/d_alpha d_sigma sigma), d = v - g s / 2 guided on d,
    x += d dt + sqrt(g) sqrt(|dt|) eps, and the last step returns x + d dt."""
    scale, null = 1.7, 3
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=null, path_type=path_type)
    z, y = _noise((5, 1, 2, 1)), _labels(5)
    eps = [_noise(z.shape, seed) for seed in (1, 2)]
    draws = iter(eps)
    out = euler_maruyama_sampler(model, z, y, num_steps=3, cfg_scale=scale, path_type=path_type,
                                 null_class=null, step_noise=lambda eps: eps.copy_(next(draws)))

    def drift(x, t):
        alpha, sigma, d_alpha, d_sigma = (float(c) for c in interpolant(torch.tensor(t, dtype=torch.float64), path_type))
        ratio = alpha / d_alpha
        d = []
        for labels in (y, torch.full_like(y, null)):
            v = model(x, torch.full((len(y),), t, dtype=torch.float64), labels)
            d.append(v - 0.5 * (2 * t) * (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma))
        return d[1] + scale * (d[0] - d[1])

    x = z
    for (t, t_next), e in zip([(1.0, 0.52), (0.52, 0.04)], eps):
        x = x + drift(x, t) * (t_next - t) + math.sqrt(2 * t) * math.sqrt(t - t_next) * e
    expected = x + drift(x, 0.04) * (0.0 - 0.04)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sde_global_rng_draws():
    """Without step_noise: exactly num_steps - 1 float64 randn_like(x) draws from the global RNG, and a step_noise
    writing torch.randn_like draws reproduces that run; with another step_noise the global RNG is not touched."""
    num_steps, shape = 5, (4, 2, 3, 3)
    model = GaussianModel([0.3, -1.0], [0.8, 1.2], "linear")
    z, y = _noise(shape), _labels(shape[0])

    torch.manual_seed(0)
    out = euler_maruyama_sampler(model, z, y, num_steps=num_steps)
    after = torch.randn(8)
    torch.manual_seed(0)
    for _ in range(num_steps - 1):
        torch.randn_like(z)
    assert torch.equal(after, torch.randn(8))

    torch.manual_seed(0)
    assert torch.equal(out, euler_maruyama_sampler(model, z, y, num_steps=num_steps,
                                                      step_noise=lambda eps: eps.copy_(torch.randn_like(eps))))

    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    euler_maruyama_sampler(model, z, y, num_steps=num_steps,
                           step_noise=lambda eps: eps.normal_(generator=generator))
    untouched = torch.randn(8)
    torch.manual_seed(0)
    assert torch.equal(untouched, torch.randn(8))


def _per_sample_noise(seeds):
    """A step_noise drawing each row's noise from its own generator (what generate.py does)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return lambda eps: eps.copy_(torch.stack([torch.randn(eps.shape[1:], generator=g, dtype=eps.dtype)
                                              for g in generators]))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sde_sample_does_not_depend_on_its_batch(cfg_scale):
    """With per-sample generator noise, a sample is identical whether drawn in a batch of 4 or alone."""
    seeds = [11, 12, 13, 14]
    z = torch.stack([_noise((1, 3, 2), seed) for seed in seeds])
    y = _labels(4)
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=3)
    kwargs = dict(num_steps=20, cfg_scale=cfg_scale, guidance_high=0.7, null_class=3)
    batch = euler_maruyama_sampler(model, z, y, step_noise=_per_sample_noise(seeds), **kwargs)
    for i, seed in enumerate(seeds):
        alone = euler_maruyama_sampler(model, z[i:i + 1], y[i:i + 1], step_noise=_per_sample_noise([seed]), **kwargs)
        assert torch.equal(alone[0], batch[i])


# ---------------------------------------------------------------------------------------------------------------
# Determinism and dtypes


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_same_seed_same_output(sampler):
    model = GaussianModel([0.3], [0.8], "linear")
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        z = torch.randn(5, 1, 2, 2)
        outs.append(sampler(model, z, _labels(5), num_steps=12))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_called_in_latent_dtype_and_output_float64(sampler, dtype):
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=3)
    z = _noise((4, 1, 2, 2)).to(dtype)
    out = sampler(model, z, _labels(4), num_steps=6, heun=True, cfg_scale=2.0, guidance_high=0.5, null_class=3)
    assert out.dtype == torch.float64 and out.shape == z.shape
    assert all(call["x_dtype"] == dtype and call["t_dtype"] == dtype for call in model.calls)
    assert {call["rows"] for call in model.calls} == {4, 8}


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_rejects_zero_steps(sampler):
    with pytest.raises(ValueError, match="num_steps"):
        sampler(GaussianModel([0.0], [1.0], "linear"), _noise((1, 1, 1, 1)), _labels(1), num_steps=0)


# ---------------------------------------------------------------------------------------------------------------
# Memory: the loop allocates nothing per step


class LoopAllocations(TorchDispatchMode):
    """Records every op run outside the model's calls whose output owns new storage (an allocation); views, in-place
    ops and out= ops write into storage they were given and are not recorded."""

    def __init__(self):
        super().__init__()
        self.in_model = False
        self.ops = []

    def model(self, model):
        """model, with its calls (and their allocations) left out of the record."""
        def call(*args):
            self.in_model = True
            try:
                return model(*args)
            finally:
                self.in_model = False
        return call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.in_model:
            given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if any(t.untyped_storage().data_ptr() not in given for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("sampler, heun", [(euler_sampler, False), (euler_sampler, True), (euler_maruyama_sampler, False)])
def test_loop_allocates_nothing_per_step(sampler, heun):
    """A run of 12 steps allocates, outside the model, exactly what a run of 3 does (its buffers, once): with guidance
    on part of the steps, Heun, and the SDE's step noise from generate.py's per-sample generators."""
    model = ClassGaussianModel([-2.0, 0.5, 3.0], 0.7, null_class=3)
    seeds = [sample_seed(0, i) for i in range(4)]
    allocations = []
    for num_steps in (3, 12):
        record = LoopAllocations()
        z, y = _noise((4, 1, 2, 2)).float(), _labels(4)
        with record:
            sampler(record.model(model), z, y, num_steps=num_steps, heun=heun, cfg_scale=2.0, guidance_high=0.6,
                    null_class=3, step_noise=RowGenerators(seeds, torch.device("cpu")).fill_normal)
        allocations.append(record.ops)
    assert allocations[0] == allocations[1]
    assert len(model.calls) == sum(2 * n - 1 if heun else n for n in (3, 12))
