"""The ADM suite's metrics (openai/guided-diffusion, evaluations/evaluator.py) as plain functions of features.

- `statistics` + `frechet_distance`: FID on pool_3 features and sFID on the spatial ones.
- `inception_score`: IS from the 1008-way softmax, in splits of 5000.
- `precision_recall`: the k-NN manifold estimate of Kynkaanniemi et al. with the suite's k = 3, its 10,000 x 10,000
  blocks and its float16 pairwise distances, run with torch on any device.
"""
import warnings

import numpy as np
import torch
from scipy import linalg

K_NEIGHBOURS = 3
BLOCK = 10_000  # the suite's row and column batch of pairwise distances; overflow is detected per block


def statistics(activations):
    """Activations (N, D) -> (mu (D,), sigma (D, D)), sigma the unbiased covariance `np.cov(rowvar=False)`."""
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The Frechet distance |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) of two Gaussians.

    As the suite: when the square root is not finite (a singular product), eps is added to both diagonals; a
    complex square root whose diagonal has an imaginary part above 1e-3 is a ValueError, a smaller one is dropped."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def class_probabilities(pool, logits_weight):
    """pool_3 features (N, 2048) and the logits weights (1008, 2048) -> softmax(pool @ W^T) (N, 1008), float32 numpy.

    No bias, as the suite (it takes only the MatMul's weights from the graph)."""
    weight = torch.as_tensor(logits_weight, dtype=torch.float32)
    pool = torch.as_tensor(pool, dtype=torch.float32, device=weight.device)
    return torch.softmax(pool @ weight.T, dim=1).cpu().numpy()


def inception_score(probs, split_size=5000):
    """probs (N, C) -> the mean over consecutive splits of split_size rows of exp(mean_i KL(p_i || mean_j p_j)).

    The suite's formula; a last split shorter than split_size counts as one. A probability of exactly 0 adds 0
    (0 log 0 = 0), where the suite's `p * log p` would give NaN. N < split_size is a ValueError."""
    if len(probs) < split_size:
        raise ValueError(f"{len(probs)} samples are fewer than one split of {split_size}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = np.mean(part, axis=0, keepdims=True)
        kl = np.sum(_xlogy(part, part) - _xlogy(part, marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def _xlogy(x, y):
    """x * log(y), 0 where x == 0, in x's dtype."""
    safe = np.where(x > 0, y, 1).astype(x.dtype)
    return np.where(x > 0, x * np.log(safe), 0).astype(x.dtype)


def _float16(x):
    """Rounds a float32 tensor to float16 precision, kept in float32 (inf where it overflows float16)."""
    return x.half().float()


def squared_distances(u, v):
    """Pairwise squared distances max(|u|^2 - 2 u.v + |v|^2, 0) of u (R, D) and v (C, D) -> (R, C) float32.

    Computed as the suite does, in float16, and over again in float32 when anything in the block overflows. The
    float16 result is produced by float32 arithmetic on float16-rounded inputs, each norm, the product and each sum
    rounded to float16: the same numbers as torch's float16 kernels (checked bit for bit on a CPU), at float32 speed.
    The rounding is part of the definition: exact distances give other radii and counts."""
    u16, v16 = _float16(u), _float16(v)
    norm_u = _float16(_float16(u16 * u16).sum(1))
    norm_v = _float16(_float16(v16 * v16).sum(1))
    twice_dot = _float16(2 * _float16(u16 @ v16.T))
    dist = _float16(_float16(norm_u[:, None] - twice_dot) + norm_v[None, :]).clamp_(min=0)
    if torch.isfinite(dist).all():
        return dist
    norm_u, norm_v = (u * u).sum(1), (v * v).sum(1)
    return (norm_u[:, None] - 2 * (u @ v.T) + norm_v[None, :]).clamp_(min=0)


def manifold_radii(features, k=K_NEIGHBOURS, block=BLOCK):
    """features (N, D) tensor -> (N,) squared distance of each point to its k-th nearest neighbour, itself not
    counted (the (k+1)-th smallest distance with itself at 0), from distances in blocks of block x block."""
    radii = torch.empty(len(features), device=features.device)
    for row in range(0, len(features), block):
        rows = features[row:row + block]
        nearest = torch.empty(len(rows), 0, device=features.device)
        for col in range(0, len(features), block):
            dist = torch.cat([nearest, squared_distances(rows, features[col:col + block])], dim=1)
            nearest = dist.topk(min(k + 1, dist.shape[1]), dim=1, largest=False).values
        radii[row:row + block] = nearest[:, k]
    return radii


def precision_recall(ref_features, sample_features, k=K_NEIGHBOURS, block=BLOCK, device="cpu"):
    """ref (N1, D) and sample (N2, D) features (numpy or torch) -> (precision, recall) as floats.

    precision: the fraction of samples within the k-NN ball (radius from manifold_radii) of some reference point;
    recall: the fraction of reference points within the ball of some sample. A point on a ball's boundary is in it.
    Both sets need more than k points."""
    ref = torch.as_tensor(ref_features, dtype=torch.float32, device=device)
    sample = torch.as_tensor(sample_features, dtype=torch.float32, device=device)
    if min(len(ref), len(sample)) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} points in each set, "
                         f"got {len(ref)} and {len(sample)}")
    ref_radii, sample_radii = manifold_radii(ref, k, block), manifold_radii(sample, k, block)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    for row in range(0, len(ref), block):
        for col in range(0, len(sample), block):
            dist = squared_distances(ref[row:row + block], sample[col:col + block])
            ref_covered[row:row + block] |= (dist <= sample_radii[None, col:col + block]).any(dim=1)
            sample_covered[col:col + block] |= (dist <= ref_radii[row:row + block, None]).any(dim=0)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()
