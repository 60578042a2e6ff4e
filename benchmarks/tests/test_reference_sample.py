"""benchmarks/reference_sample.py, the released SDE loop that bench_sample.py times against ours, computes
what SiT's samplers.euler_maruyama_sampler computes: with the same step noise the samples agree to float64
rounding (atol 1e-12 on values of order 1), so the benchmark compares equal work."""
import pytest
import torch
from common import import_tree


def noise(seed):
    """The released loop's step_noise (x -> fresh noise like x) drawing from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)


def noise_into(seed):
    """Ours' step_noise (fills its argument) with noise(seed)'s draws."""
    draw = noise(seed)
    return lambda eps: eps.copy_(draw(eps))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("cfg_scale", [1.0, 1.8])
def test_reference_sde_loop_gives_our_samples(path_type, cfg_scale):
    models, samplers, reference_sample = import_tree("SiT-T/2", "models", "samplers", "reference_sample")
    torch.manual_seed(0)
    model = models.SiT_models["SiT-T/2"](input_size=4, num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    latents, labels = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3])
    settings = dict(num_steps=30, cfg_scale=cfg_scale, guidance_low=0.1, guidance_high=0.7, path_type=path_type,
                    null_class=10)
    ours = samplers.euler_maruyama_sampler(model, latents, labels, step_noise=noise_into(1), **settings)
    reference = reference_sample.reference_sde_sampler(model, latents, labels, step_noise=noise(1), **settings)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
