"""Respacing: which steps are kept, alpha-bar preserved at them, models see original steps."""

import numpy as np
import pytest
import torch
from diffusion import create_diffusion
from diffusion.respace import space_timesteps


def _original_alpha_bar():
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def test_space_timesteps_even():
    assert space_timesteps(1000, "10") == set(range(0, 1000, 111))
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "1") == {0}


def test_space_timesteps_sections():
    """"10,15": two sections of 500 steps, 10 steps over 0..499, then 15 over 500..999."""
    kept = sorted(space_timesteps(1000, "10,15"))
    first, second = [k for k in kept if k < 500], [k for k in kept if k >= 500]
    assert len(first) == 10 and len(second) == 15
    assert first[0] == 0 and first[-1] == 499 and second[0] == 500 and second[-1] == 999
    # uneven split: 10 steps in 3 sections of sizes 4, 3, 3
    assert space_timesteps(10, "2,1,3") == {0, 3, 4, 7, 8, 9}


def test_space_timesteps_ddim():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    with pytest.raises(ValueError, match="exactly"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="divide"):
        space_timesteps(100, "60,10")


@pytest.mark.parametrize("respacing, count", [("250", 250), ("10,15", 25), ("ddim50", 50), ("", 1000), (None, 1000)])
def test_respacing_keeps_alpha_bar(respacing, count):
    diffusion = create_diffusion(respacing)
    assert diffusion.num_timesteps == count == len(diffusion.timestep_map)
    assert diffusion.timestep_map == sorted(space_timesteps(1000, respacing or [1000]))
    np.testing.assert_allclose(diffusion.alphas_cumprod, _original_alpha_bar()[diffusion.timestep_map], rtol=1e-12)


class _RecordingModel:
    """eps = 0 and v = 0 (learned-range output of 2C channels); records the steps it is given."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t):
        self.seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


@pytest.mark.parametrize("respacing", ["10", "ddim50", "3,2"])
def test_wrapped_model_receives_original_timesteps(respacing):
    diffusion = create_diffusion(respacing)
    model = _RecordingModel()
    diffusion.p_sample_loop(model, (3, 2, 4), device="cpu")
    expected = sorted(space_timesteps(1000, respacing), reverse=True)
    assert len(model.seen) == len(expected)
    for t, original in zip(model.seen, expected):
        assert t.dtype == torch.long and t.shape == (3,)
        assert torch.all(t == original)

    model.seen.clear()
    diffusion.training_losses(model, torch.zeros(2, 2, 4), torch.tensor([0, diffusion.num_timesteps - 1]))
    assert model.seen[0].tolist() == [0, expected[0]]
