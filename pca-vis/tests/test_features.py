"""The features given to the PCA are the model's own eval-mode `model.features` at each layer."""
import pytest
import torch
from conftest import LATENT, NUM_CLASSES, tiny_sit

from main_pca import extract_features, layer_features


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
def test_layer_features_noise_the_latent_and_use_the_time_convention(baseline):
    """x_t = (1 - t) x + t noise, one row per time; the model gets t (SRA) or 1 - t (original SiT)."""
    model = tiny_sit(learn_sigma=baseline)
    gen = torch.Generator().manual_seed(5)
    latent, noise = torch.randn(2, 1, 4, LATENT, LATENT, generator=gen)
    times, layers, label = [0.7, 0.3, 0.0], [2, 9], 6
    features = layer_features(model, latent, noise, times, layers, label, baseline)
    with torch.no_grad():
        for i, t in enumerate(times):
            t_model = torch.tensor([1 - t if baseline else t])
            for k in layers:
                expected = model.features((1 - t) * latent + t * noise, t_model, torch.tensor([label]), depth=k)[0]
                torch.testing.assert_close(features[k][i], expected, rtol=1e-5, atol=1e-5)
