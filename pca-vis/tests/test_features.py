"""The features given to the PCA: the model's own eval-mode `model.features` at each layer, and these normalised
against the released pca-vis model's tokens and norm_feat, written out in conftest."""
import pytest
import torch
from conftest import LATENT, NUM_CLASSES, released_normalised, released_tokens, tiny_sit

from main_pca import extract_features, layer_features, model_times, noisy_latents, normalise


def inputs(batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, t, y


def test_extract_features_equals_model_features_at_each_layer():
    model = tiny_sit()
    x, t, y = inputs()
    layers = [12, 1, 4, 7]
    features = extract_features(model, x, t, y, layers)
    assert sorted(features) == sorted(layers)
    with torch.no_grad():
        for k in layers:
            expected = model.features(x, t, y, depth=k)
            assert features[k].shape == (3, (LATENT // 2) ** 2, 384)
            assert torch.equal(features[k], expected), k
    # consecutive blocks really differ (the weights are not the identity init)
    assert not torch.allclose(features[1], features[4])
    assert all(not block._forward_hooks for block in model.blocks)  # the hooks are removed


@pytest.mark.parametrize("bad", [[0, 4], [13], [-1]])
def test_layers_outside_the_model_are_an_error(bad):
    model = tiny_sit()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="outside 1..12"):
        extract_features(model, x, t, y, bad)
    assert all(not block._forward_hooks for block in model.blocks)


@pytest.mark.parametrize("baseline", [False, True])
def test_layer_features_are_the_released_models_normalised_tokens(baseline):
    """One batch row per time; each map is what the released pca-vis model returns for that block (its tokens through
    its norm_feat), up to float32 rounding (our attention kernel and operation order differ)."""
    model = tiny_sit(learn_sigma=baseline)
    x, t, _ = inputs()
    layers, label = [2, 9], 6
    features = layer_features(model, x, t, label, layers, baseline)
    tokens = released_tokens(model.state_dict(), x, t, torch.full((3,), label), layers, num_heads=6, patch=2)
    for k in layers:
        torch.testing.assert_close(features[k], released_normalised(tokens[k], baseline), rtol=1e-4, atol=1e-4)


def test_normalise_sra_is_a_layer_norm_per_token():
    tokens = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = normalise(tokens, baseline=False).double()
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 16, dtype=torch.float64), atol=1e-5, rtol=0)


def test_normalise_baseline_min_maxes_each_channel_over_the_tokens():
    tokens = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    out = normalise(tokens, baseline=True)
    low, high = tokens.amin(1, keepdim=True), tokens.amax(1, keepdim=True)
    torch.testing.assert_close(out.amin(1), torch.zeros(2, 32, dtype=torch.float64))
    torch.testing.assert_close(out.amax(1), ((high - low) / (high - low + 1e-6))[:, 0])


@pytest.mark.parametrize("baseline, legacy, expected", [
    (False, True, [0.7, 0.25]), (True, True, [0.7, 0.25]), (True, False, [0.3, 0.75]),
])
def test_model_times(baseline, legacy, expected):
    torch.testing.assert_close(model_times([0.7, 0.25], baseline, legacy), torch.tensor(expected))


def test_noisy_latents_draw_a_posterior_sample_then_noise_per_time():
    gen = torch.Generator().manual_seed(1)
    mean, std = torch.randn(1, 4, 2, 2, generator=gen), torch.rand(1, 4, 2, 2, generator=gen)
    x_t = noisy_latents(mean, std, [0.7, 0.0], torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    draws = [torch.randn(1, 4, 2, 2, generator=gen) for _ in range(4)]  # eps, noise, eps, noise
    torch.testing.assert_close(x_t[0:1], 0.3 * (mean + std * draws[0]) * 0.18215 + 0.7 * draws[1])
    torch.testing.assert_close(x_t[1:2], (mean + std * draws[2]) * 0.18215)
