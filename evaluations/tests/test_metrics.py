"""The metric functions against closed forms and against a plain re-derivation of the ADM suite's code."""
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from metrics import frechet_distance, inception_score, manifold_radii, precision_recall, squared_distances


# ---------------------------------------------------------------------------------------------- FID

def fid_from_eigenvalues(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), the last trace as the sum of the square
    roots of the eigenvalues of the symmetric sigma1^(1/2) sigma2 sigma1^(1/2) (similar to sigma1 sigma2): numpy's
    eigh instead of scipy's sqrtm."""
    w, q = np.linalg.eigh(sigma1)
    root1 = q @ np.diag(np.sqrt(np.clip(w, 0, None))) @ q.T
    eigenvalues = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(np.clip(eigenvalues, 0,
                                                                                                       None)))


def test_fid_of_gaussians_with_commuting_covariances_is_the_closed_form():
    """Same eigenvectors: FID = |mu1 - mu2|^2 + sum_i (a_i + b_i - 2 sqrt(a_i b_i))."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu1, q @ np.diag(a) @ q.T) == pytest.approx(0, abs=1e-9)


def test_fid_of_covariances_of_activations_is_the_eigenvalue_formula():
    """Non-commuting covariances of correlated activations, where only the general formula holds."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 12)) @ rng.standard_normal((12, 12))
    y = rng.standard_normal((30, 12)) @ rng.standard_normal((12, 12)) + 0.3
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(fid_from_eigenvalues(*args), rel=1e-9)


def test_fid_with_a_singular_covariance():
    """A zero-variance direction in both: sqrt(diag(4, 0, 4)) = diag(2, 0, 2), no fallback needed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # scipy notes the singular product; the result is exact
        warnings.simplefilter("error", UserWarning)
        got = frechet_distance(np.zeros(3), np.diag([1.0, 0, 4]), np.ones(3), np.diag([4.0, 0, 1]))
    assert got == pytest.approx(3 + (1 + 4 - 4) + (4 + 1 - 4), rel=1e-12)


def test_fid_adds_eps_to_the_diagonals_when_the_square_root_is_not_finite():
    """sqrtm([[0, 1], [0, 0]]) has no square root (inf); with eps the product is (1 + eps) [[eps, 1], [0, eps]],
    whose root has the diagonal sqrt(eps (1 + eps)), so FID = 0 + 2 - 4 sqrt(eps (1 + eps))."""
    eps = 1e-6
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"), warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        got = frechet_distance(np.zeros(2), np.array([[0.0, 1], [0, 0]]), np.zeros(2), np.eye(2), eps=eps)
    assert got == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_fid_refuses_a_square_root_with_an_imaginary_diagonal():
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))


def test_fid_refuses_statistics_of_different_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------- IS

def suite_inception_score(preds, split_size):
    """The suite's compute_inception_score after the softmax."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert inception_score(np.full((20, 8), 1 / 8, dtype=np.float32), split_size=10) == pytest.approx(1)
    one_hot = np.eye(8, dtype=np.float32)[np.arange(40) % 8]  # every class equally often: IS = 8
    assert inception_score(one_hot, split_size=40) == pytest.approx(8, rel=1e-6)


def test_inception_score_averages_over_splits():
    """First split: 5 different classes (IS 5); second: one class (IS 1); the mean is 3."""
    one_hot = np.eye(5, dtype=np.float32)[[0, 1, 2, 3, 4, 2, 2, 2, 2, 2]]
    assert inception_score(one_hot, split_size=5) == pytest.approx(3, rel=1e-6)


def test_inception_score_matches_the_suite_with_a_short_last_split():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((23, 50)).astype(np.float32) * 3
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    assert inception_score(probs, split_size=10) == pytest.approx(suite_inception_score(probs, 10), rel=1e-6)


def test_fewer_rows_than_one_split_are_one_shorter_split():
    """As the suite: 4 rows with a split of 5000 are one split of 4; two classes equally often give IS 2."""
    assert inception_score(np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], split_size=5000) == pytest.approx(2, rel=1e-6)
    rng = np.random.default_rng(3)
    probs = torch.softmax(torch.from_numpy(rng.standard_normal((7, 20)).astype(np.float32)), dim=1).numpy()
    assert inception_score(probs, split_size=5000) == pytest.approx(suite_inception_score(probs, 7), rel=1e-6)


# ---------------------------------------------------------------------------------------------- precision, recall

def suite_distances(u, v):
    """The suite's DistanceBlock: max(|u|^2 - 2 u.v + |v|^2, 0) in float16, in float32 if anything overflows."""
    u16, v16 = u.half(), v.half()
    d = torch.clamp((u16 * u16).sum(1)[:, None] - 2 * (u16 @ v16.T) + (v16 * v16).sum(1)[None, :], min=0)
    if torch.isfinite(d).all():
        return d.float().numpy()
    return torch.clamp((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :], min=0).numpy()


def suite_precision_recall(ref, sample, batch):
    """The suite's ManifoldEstimator with k = 3 and row/column batches of `batch`, in numpy."""
    def radii(features):
        n = len(features)
        out = np.zeros(n, dtype=np.float32)
        for b1 in range(0, n, batch):
            row = np.concatenate([suite_distances(features[b1:b1 + batch], features[b2:b2 + batch])
                                  for b2 in range(0, n, batch)], axis=1)
            out[b1:b1 + batch] = np.partition(row, [0, 1, 2, 3], axis=1)[:, 3]
        return out

    r_ref, r_sample = radii(ref), radii(sample)
    ref_in, sample_in = np.zeros(len(ref), bool), np.zeros(len(sample), bool)
    for b1 in range(0, len(ref), batch):
        for b2 in range(0, len(sample), batch):
            d = suite_distances(ref[b1:b1 + batch], sample[b2:b2 + batch])
            ref_in[b1:b1 + batch] |= np.any(d <= r_sample[None, b2:b2 + batch], axis=1)
            sample_in[b2:b2 + batch] |= np.any(d <= r_ref[b1:b1 + batch, None], axis=0)
    return float(np.mean(sample_in)), float(np.mean(ref_in))


def inception_like(n, seed, scale=0.5):
    """n non-negative 2048-d features with |x|^2 of a few hundred, like pool_3 (where float16 rounding matters)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2048, generator=g) * scale * 2) ** 2


def test_squared_distances_are_torchs_float16_distances():
    u, v = inception_like(30, 0), inception_like(20, 1)
    got = squared_distances(u, v)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), suite_distances(u, v))
    exact = torch.cdist(u.double(), v.double()) ** 2
    assert not torch.equal(got.double(), exact)  # float16 rounding is really there
    assert torch.allclose(got.double(), exact, rtol=2e-3)


def test_squared_distances_fall_back_to_float32_when_float16_overflows():
    u, v = inception_like(6, 0) * 100, inception_like(5, 1) * 100  # |u|^2 ~ 5e6 > 65504
    got = squared_distances(u, v)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), torch.cdist(u.double(), v.double()) ** 2, rtol=1e-4)


def test_manifold_radii_are_the_radii_of_torchs_float16_distances():
    """One block of 300 points (its products computed in 16 bands above the diagonal and mirrored below), then blocks
    of 7 (each pair of blocks sharing one product, transposed for the second): both give the 4th smallest float16
    distance of each row (itself included), from torch's float16 kernels."""
    features = inception_like(300, 4)
    assert np.array_equal(manifold_radii(features).numpy(),
                          np.partition(suite_distances(features, features), 3, axis=1)[:, 3])
    few = features[:40]
    assert np.array_equal(manifold_radii(few, block=7).numpy(), np.partition(suite_distances(few, few), 3, axis=1)[:, 3])


def test_precision_recall_of_points_whose_balls_are_known():
    """1-d points on the first axis of 4-d space (float16-exact). k = 3, squared radii:
    ref 0..9: 9 at the ends, 4 inside; samples 4.5, 5.5, 6.5, 7.5 (radii 9, 4, 4, 9) and a far group 30..33.
    Precision: the four near samples lie within 0.5 of a ref point, the far ones in no ball: 4/8.
    Recall: the near samples' balls cover [1.5, 7.5] U [3.5, 7.5] U [4.5, 8.5] U [4.5, 10.5], i.e. refs 2..9: 8/10."""
    def on_axis(xs):
        points = np.zeros((len(xs), 4), dtype=np.float32)
        points[:, 0] = xs
        return points

    ref = on_axis(np.arange(10))
    sample = on_axis([4.5, 5.5, 6.5, 7.5, 30, 31, 32, 33])
    assert precision_recall(ref, sample) == (0.5, 0.8)
    assert suite_precision_recall(torch.from_numpy(ref), torch.from_numpy(sample), batch=10_000) == (0.5, 0.8)


def test_precision_recall_matches_the_suite_with_its_blocks_and_per_block_overflow():
    """Small blocks (7 rows/columns, ragged ends) as the suite's 10,000; one block of each set overflows float16
    and is computed in float32, the others in float16, as the suite decides block by block."""
    ref, sample = inception_like(40, 2), inception_like(31, 3)
    ref[3] *= 20
    sample[30] *= 20
    expected = suite_precision_recall(ref, sample, batch=7)
    assert precision_recall(ref, sample, block=7) == expected
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where the estimate is not trivial
    full = precision_recall(ref.numpy(), sample.numpy())
    assert full == suite_precision_recall(ref, sample, batch=10_000)


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
