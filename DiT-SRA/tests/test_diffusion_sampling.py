"""Samplers with an analytic model, and the order and source of their random draws.

For data x_0 ~ N(m, s^2) (independent per dimension) and x_t = sqrt(a) x_0 + sqrt(1 - a) eps,
a = abar_t, everything is jointly Gaussian with V = Var[x_t] = a s^2 + 1 - a, so the optimal
predictions are
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / V,     Var[x_0 | x_t] = s^2 (1 - a) / V.
The true reverse step of a (respaced) chain is x_{t'} | x_t ~ N(c1 E[x_0|x_t] + c2 x_t,
btilde + c1^2 Var[x_0|x_t]), t' the previous kept step, c1 = beta sqrt(abar_{t'}) / (1 - a),
btilde = beta (1 - abar_{t'}) / (1 - a), beta = 1 - a / abar_{t'}. The model below returns the
optimal eps and the learned-range value v that makes the sampler's variance exactly that
conditional variance (v = -1 would give btilde alone, too small by c1^2 Var[x_0|x_t], which
shrinks the samples' std by up to 16% with 50 steps). The ancestral sampler is then exact for
every respacing, up to x_T ~ N(0, 1) instead of N(sqrt(abar_T) m, ~1) (abar_T ~ 4e-5) and the
last step returning E[x_0 | x_1] (variance short by ~1e-4 s^2): both far below the Monte Carlo
tolerance. All schedule values here come from the definition (linear betas 1e-4..0.02).
"""

import math

import numpy as np
import pytest
import torch
from diffusion import create_diffusion
from diffusion.respace import space_timesteps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The loops below run thousands of steps on small tensors; several intra-op threads gain
    nothing there and, on a busy machine, OpenMP's waiting made them ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ALPHA_BAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
MEANS = torch.tensor([0.5, -0.4], dtype=torch.float64)
STDS = torch.tensor([0.3, 0.8], dtype=torch.float64)


class GaussianDataModel:
    """Optimal eps and exact-variance v for data N(MEANS[c], STDS[c]^2), inputs (N, 2, ...).

    kept: the original steps of the chain (to find each step's predecessor). The per-step,
    per-channel coefficients eps = k_x x + k_0 and v are tabulated in float64."""

    def __init__(self, kept):
        kept = sorted(kept)
        self.k_x = torch.zeros(1000, 2, dtype=torch.float64)
        self.k_0 = torch.zeros(1000, 2, dtype=torch.float64)
        self.v = torch.zeros(1000, 2, dtype=torch.float64)  # at t = 0 no noise is added: v = 0 will do
        s2 = STDS ** 2
        for i, step in enumerate(kept):
            a = ALPHA_BAR[step]
            total_var = a * s2 + 1 - a
            self.k_x[step] = math.sqrt(1 - a) / total_var
            self.k_0[step] = -math.sqrt(1 - a) * math.sqrt(a) * MEANS / total_var
            if i > 0:
                a_prev = ALPHA_BAR[kept[i - 1]]
                beta = 1 - a / a_prev
                btilde = beta * (1 - a_prev) / (1 - a)
                c1 = beta * math.sqrt(a_prev) / (1 - a)
                target_var = btilde + c1 ** 2 * s2 * (1 - a) / total_var
                self.v[step] = 2 * (target_var.log() - math.log(btilde)) / (math.log(beta) - math.log(btilde)) - 1

    def __call__(self, x, t):
        shape = (x.shape[0], 2) + (1,) * (x.ndim - 2)
        eps = self.k_x[t].view(shape) * x.double() + self.k_0[t].view(shape)
        return torch.cat([eps, self.v[t].view(shape).expand_as(eps)], dim=1).float()


def _moments(sample):
    per_channel = sample.double().transpose(0, 1).reshape(2, -1)
    return per_channel.mean(1), per_channel.std(1), per_channel.shape[1]


def _check_moments(sample, allowance):
    """Per channel: |mean - m| <= 5 s / sqrt(n) + allowance s and |std - s| <= 5 s / sqrt(2n) +
    allowance s (5 standard errors, plus a stated discretisation allowance)."""
    mean, std, n = _moments(sample)
    assert torch.all((mean - MEANS).abs() <= 5 * STDS / math.sqrt(n) + allowance * STDS), (mean, std)
    assert torch.all((std - STDS).abs() <= 5 * STDS / math.sqrt(2 * n) + allowance * STDS), (mean, std)


def _generator_noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda noise: noise.copy_(torch.randn(noise.shape, generator=g))


SHAPE = (8000, 2, 2, 2)  # 32,000 values per channel


@pytest.mark.parametrize("respacing", ["", "50"])
def test_p_sample_loop_recovers_gaussian_data(respacing):
    diffusion = create_diffusion(respacing)
    model = GaussianDataModel(space_timesteps(1000, respacing or [1000]))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    sample = diffusion.p_sample_loop(model, SHAPE, noise=noise, step_noise=_generator_noise(2))
    assert sample.shape == SHAPE and sample.dtype == torch.float32
    _check_moments(sample, allowance=1e-3)


@pytest.mark.parametrize("respacing, allowance", [("", 0.01), ("250", 0.025)])
def test_ddim_sample_loop_recovers_gaussian_data(respacing, allowance):
    """DDIM (eta = 0) is deterministic given x_T; its discretisation shrinks the std slightly (by
    0.5% of s for 1000 steps and 1.8% for 250 steps with s = 0.3), hence the allowance."""
    diffusion = create_diffusion(respacing)
    model = GaussianDataModel(space_timesteps(1000, respacing or [1000]))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sample = diffusion.ddim_sample_loop(model, SHAPE, noise=noise, eta=0.0)
    _check_moments(sample, allowance=allowance)


SMALL = (3, 2, 2, 2)


def _small_run(shape=SMALL, respacing="20", **kwargs):
    diffusion = create_diffusion(respacing)
    model = GaussianDataModel(space_timesteps(1000, respacing))
    return diffusion.p_sample_loop(model, shape, **kwargs)


def test_step_noise_is_deterministic():
    noise = torch.randn(SMALL)
    first = _small_run(noise=noise, step_noise=_generator_noise(7))
    second = _small_run(noise=noise, step_noise=_generator_noise(7))
    other = _small_run(noise=noise, step_noise=_generator_noise(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_default_noise_is_global_randn_like():
    """Without step_noise the per-step noise is torch.randn_like(x) from the global generator:
    a generator seeded like the global one gives the same samples."""
    noise = torch.randn(SMALL)
    torch.manual_seed(11)
    default = _small_run(noise=noise)
    torch.manual_seed(11)
    default_again = _small_run(noise=noise)
    with_generator = _small_run(noise=noise, step_noise=_generator_noise(11))
    assert torch.equal(default, default_again)
    assert torch.equal(default, with_generator)


def test_initial_noise_drawn_from_global_generator():
    torch.manual_seed(5)
    expected_start = torch.randn(*SMALL)
    torch.manual_seed(5)
    from_seed = _small_run(step_noise=_generator_noise(0), device="cpu")
    given = _small_run(noise=expected_start, step_noise=_generator_noise(0))
    assert torch.equal(from_seed, given)


def test_per_sample_generators_make_samples_batch_independent():
    """One generator per sample (the generation script's use of step_noise): sample i does not
    depend on which other samples share its batch."""
    def per_sample_noise(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return lambda noise: noise.copy_(torch.stack([torch.randn(noise.shape[1:], generator=g) for g in gens]))

    start = torch.randn(SMALL)
    batch = _small_run(noise=start, step_noise=per_sample_noise([10, 11, 12]))
    alone = _small_run((1, *SMALL[1:]), noise=start[1:2].clone(), step_noise=per_sample_noise([11]))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-6, atol=1e-6)


def test_model_called_before_noise_at_every_step():
    """Each step: model call, then one noise draw, including the last step (t = 0)."""
    diffusion = create_diffusion("5")
    events = []
    model = GaussianDataModel(space_timesteps(1000, "5"))

    def recording_model(x, t):
        events.append(("model", int(t[0])))
        return model(x, t)

    def recording_noise(noise):
        events.append(("noise",))
        return noise.normal_()

    diffusion.p_sample_loop(recording_model, SMALL, noise=torch.randn(SMALL), step_noise=recording_noise)
    steps = sorted(space_timesteps(1000, "5"), reverse=True)
    assert events == [e for s in steps for e in (("model", s), ("noise",))]


def test_ddim_noise_only_with_eta():
    """DDIM draws its per-step noise like p_sample, but with eta = 0 the noise has no effect."""
    diffusion = create_diffusion("20")
    model = GaussianDataModel(space_timesteps(1000, "20"))
    start = torch.randn(SMALL)
    runs = {(eta, seed): diffusion.ddim_sample_loop(model, SMALL, noise=start, eta=eta, step_noise=_generator_noise(seed))
            for eta in (0.0, 1.0) for seed in (0, 1)}
    assert torch.equal(runs[0.0, 0], runs[0.0, 1])
    assert not torch.equal(runs[1.0, 0], runs[1.0, 1])
    assert torch.equal(runs[1.0, 0], diffusion.ddim_sample_loop(model, SMALL, noise=start, eta=1.0,
                                                                step_noise=_generator_noise(0)))


def test_last_step_adds_no_noise():
    diffusion = create_diffusion("5")
    model = GaussianDataModel(space_timesteps(1000, "5"))
    x, t = torch.randn(SMALL), torch.zeros(SMALL[0], dtype=torch.long)
    a = diffusion.p_sample(model, x, t, step_noise=lambda x: torch.full_like(x, 3.0))["sample"]
    b = diffusion.p_sample(model, x, t, step_noise=lambda x: torch.full_like(x, -3.0))["sample"]
    assert torch.equal(a, b)
    # and at t > 0 the noise enters with std exp(0.5 log_variance)
    t1 = torch.ones_like(t)
    out = diffusion.p_mean_variance(model, x, t1)
    c = diffusion.p_sample(model, x, t1, step_noise=lambda x: torch.ones_like(x))["sample"]
    torch.testing.assert_close(c, out["mean"] + torch.exp(0.5 * out["log_variance"]))
