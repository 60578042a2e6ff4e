"""pca_rgb: the colouring of one feature map (tokens x D) by its first three principal components."""
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from main_pca import pca_rgb


def known_direction_tokens(side=8, dim=32, seed=0):
    """Tokens a_i * u + small noise, with a increasing along the token index (row-major over the grid)
    and u's largest entry positive, so channel 0 must be (a - min a) / (max a - min a) up to the noise."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.linspace(-3, 3, side * side, dtype=torch.float64)
    u = torch.randn(dim, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    u = u * torch.sign(u[u.abs().argmax()])
    w = torch.randn(dim, generator=gen, dtype=torch.float64)
    w = w - (w @ u) * u  # a second, weaker direction
    w = w / w.norm()
    b = torch.randn(side * side, generator=gen, dtype=torch.float64)
    b = b - b.mean()
    b = b - (b @ a) / (a @ a) * a  # uncorrelated with a, so u stays the first principal direction
    tokens = a[:, None] * u + 0.5 * b[:, None] * w + 1e-4 * torch.randn(side * side, dim, generator=gen,
                                                                        dtype=torch.float64)
    return tokens + 5.0, a  # an offset, which centering removes


def test_first_channel_follows_the_known_direction_with_fixed_sign():
    tokens, a = known_direction_tokens()
    rgb = pca_rgb(tokens)
    assert rgb.shape == (8, 8, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    for c in range(3):  # each component min-maxed over the tokens
        assert rgb[..., c].min() == pytest.approx(0) and rgb[..., c].max() == pytest.approx(1)
    expected = ((a - a.min()) / (a.max() - a.min())).numpy().reshape(8, 8)  # token i at (i // 8, i % 8)
    np.testing.assert_allclose(rgb[..., 0], expected, atol=1e-3)
    assert (np.argsort(rgb[..., 0].ravel()) == np.arange(64)).all()


def sklearn_rgb(tokens):
    """(T, 3): sklearn's exact PCA of tokens (T, D), each component min-maxed over the tokens."""
    scores = PCA(n_components=3, svd_solver="full").fit_transform(tokens.double().numpy())
    return (scores - scores.min(0)) / (scores.max(0) - scores.min(0))


def test_matches_sklearn_pca_including_sign():
    tokens = torch.randn(256, 48, generator=torch.Generator().manual_seed(1)) * torch.linspace(3, 0.1, 48)
    np.testing.assert_allclose(pca_rgb(tokens).reshape(256, 3), sklearn_rgb(tokens), atol=1e-9)


@pytest.mark.parametrize("thr", [0.0, 0.5])
def test_threshold_blacks_out_exactly_the_tokens_below_it(thr):
    """Against sklearn's colours: a token turns black if and only if its first component is below thr, so thr 0
    (the default) keeps every token, including the darkest one (first component exactly 0)."""
    tokens, _ = known_direction_tokens()
    full, cut = sklearn_rgb(tokens), pca_rgb(tokens, thr=thr).reshape(64, 3)
    background = full[:, 0] < thr
    assert background.sum() == {0.0: 0, 0.5: 32}[thr]  # the first component is linear in the token index
    assert (cut[background] == 0).all()
    np.testing.assert_allclose(cut[~background], full[~background], atol=1e-6)
    assert (cut[~background] != 0).any(axis=1).all()


@pytest.mark.parametrize("side", [1, 2, 8, 16, 32])
def test_any_square_token_grid(side):
    rgb = pca_rgb(torch.randn(side * side, 16, generator=torch.Generator().manual_seed(side)))
    assert rgb.shape == (side, side, 3)
    assert np.isfinite(rgb).all() and rgb.min() >= 0 and rgb.max() <= 1


def test_non_square_token_count_is_an_error():
    with pytest.raises(ValueError, match="square"):
        pca_rgb(torch.randn(12, 16))
