"""The ADM suite's metrics (openai/guided-diffusion, evaluations/evaluator.py) as plain functions of features.

- `statistics` + `frechet_distance`: FID on pool_3 features and sFID on the spatial ones.
- `inception_score`: IS from the 1008-way softmax, in splits of 5000.
- `precision_recall`: the k-NN manifold estimate of Kynkaanniemi et al. with the suite's k = 3, its 10,000 x 10,000
  blocks and its float16 pairwise distances, run with torch on any device.
"""
import math
import warnings

import numpy as np
import torch
from scipy import linalg

K_NEIGHBOURS = 3
BLOCK = 10_000  # the suite's row and column batch of pairwise distances; overflow is detected per block
SELF_PRODUCT_BANDS = 16  # a block's products with itself: 17/32 of a full product's work


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

    The suite's formula; a last split shorter than split_size counts as one, and so do N < split_size rows. A
    probability of exactly 0 adds 0 (0 log 0 = 0), where the suite's `p * log p` would give NaN."""
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


def _float16_norms(x16):
    """|x|^2 (N,) of float16-rounded rows x16 (N, D), each square and the sum rounded to float16."""
    return _float16(_float16(x16 * x16).sum(1))


class _Scratch:
    """Block-sized tensors reused by every block of one precision/recall call: the float32 products, the float32
    distances and their float16 working copy, a comparison mask. Allocated per block, the allocator handed back and
    paged in again tens of MB per block, about a quarter of the time on a CPU."""

    def __init__(self, rows, cols, device):
        size = rows * cols
        self.products, self.dist = torch.empty(size, device=device), torch.empty(size, device=device)
        self.dist16 = torch.empty(size, dtype=torch.float16, device=device)
        self.mask = torch.empty(size, dtype=torch.bool, device=device)

    @staticmethod
    def block(flat, rows, cols):
        """The first rows * cols elements of a scratch tensor as a (rows, cols) block."""
        return flat[:rows * cols].view(rows, cols)

    def product(self, u16, v16):
        """u16 (R, D) @ v16 (C, D).T as the (R, C) products block; with u16 is v16, from _self_products."""
        out = self.block(self.products, len(u16), len(v16))
        return _self_products(u16, out) if u16 is v16 else torch.mm(u16, v16.T, out=out)


def _self_products(x16, out, bands=SELF_PRODUCT_BANDS):
    """x16 @ x16.T (N, N) float32 into out (N, N) from the bands on and above the diagonal (about (bands + 1) /
    (2 bands) of the work), each entry below it the mirror of the one above: the product is symmetric up to float32
    rounding, which the float16 rounding of the distances then removes. Returns out."""
    step = -(-len(x16) // bands)
    for start in range(0, len(x16), step):
        band = x16[start:start + step] @ x16[start:].T
        out[start:start + step, start:] = band
        out[start + step:, start:start + step] = band[:, step:].T
    return out


def _distances(products, norm_u, norm_v, u, v, scratch=None):
    """Squared distances (R, C) float32 from the products (R, C) of float16-rounded u (R, D) and v (C, D) and their
    float16 norms: in float16 as the suite, or over again in float32 from u, v when anything overflows. With a
    _Scratch, the result is its `dist` block (valid until the next call), else a new tensor.

    Each op runs in float16 in place and rounds as the suite's float16 graph does; -2 p is exact (or -inf, when 2 p
    overflows). After the clamp only inf and NaN are not finite, and max passes both on."""
    rows, cols = products.shape
    dist16 = (torch.empty((rows, cols), dtype=torch.float16, device=products.device) if scratch is None
              else scratch.block(scratch.dist16, rows, cols))
    dist16.copy_(products).mul_(-2).add_(norm_u.half()[:, None]).add_(norm_v.half()[None, :]).clamp_(min=0)
    if torch.isfinite(dist16.max()):
        return dist16.float() if scratch is None else scratch.block(scratch.dist, rows, cols).copy_(dist16)
    return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]).clamp_(min=0)


def squared_distances(u, v):
    """Pairwise squared distances max(|u|^2 - 2 u.v + |v|^2, 0) of u (R, D) and v (C, D) -> (R, C) float32.

    Computed as the suite does, in float16, and over again in float32 when anything in the block overflows. The
    float16 result is produced by a float32 product of float16-rounded inputs, each norm, the product and each sum
    rounded to float16: the same numbers as torch's float16 kernels (checked bit for bit on a CPU), at float32 speed.
    The rounding is part of the definition: exact distances give other radii and counts."""
    u16, v16 = _float16(u), _float16(v)
    return _distances(u16 @ v16.T, _float16_norms(u16), _float16_norms(v16), u, v)


def _smallest(nearest, dist, count):
    """The count smallest values of each row of nearest (R, m) and dist (R, C) together, ascending: (R, count)."""
    candidates = dist.topk(min(count, dist.shape[1]), dim=1, largest=False, sorted=False).values
    return torch.cat([nearest, candidates], dim=1).topk(count, dim=1, largest=False).values


def manifold_radii(features, k=K_NEIGHBOURS, block=BLOCK, scratch=None):
    """features (N, D) tensor -> (N,) squared distance of each point to its k-th nearest neighbour, itself not
    counted (the (k+1)-th smallest distance with itself at 0), from distances in blocks of block x block (in
    `scratch`, a _Scratch of at least that size, when given).

    Each pair of blocks shares one product: distances of block a to block b, and of b to a from its transpose,
    each rounded (and checked for float16 overflow) on its own, as the suite's two blocks."""
    f16 = _float16(features)
    norms = _float16_norms(f16)
    side = min(block, len(features))
    scratch = scratch or _Scratch(side, side, features.device)
    nearest = torch.full((len(features), k + 1), math.inf, device=features.device)
    blocks = [slice(start, start + block) for start in range(0, len(features), block)]
    for i, a in enumerate(blocks):
        for b in blocks[i:]:
            rows = f16[a]
            products = scratch.product(rows, rows if a == b else f16[b])
            nearest[a] = _smallest(nearest[a], _distances(products, norms[a], norms[b], features[a], features[b],
                                                          scratch), k + 1)
            if a != b:
                nearest[b] = _smallest(nearest[b], _distances(products.T, norms[b], norms[a], features[b],
                                                              features[a], scratch), k + 1)
    return nearest[:, k]


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
    side = min(block, max(len(ref), len(sample)))
    scratch = _Scratch(side, side, ref.device)
    ref_radii, sample_radii = manifold_radii(ref, k, block, scratch), manifold_radii(sample, k, block, scratch)
    ref16, sample16 = _float16(ref), _float16(sample)
    ref_norms, sample_norms = _float16_norms(ref16), _float16_norms(sample16)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    for row in range(0, len(ref), block):
        rows = slice(row, row + block)
        for col in range(0, len(sample), block):
            cols = slice(col, col + block)
            dist = _distances(scratch.product(ref16[rows], sample16[cols]), ref_norms[rows], sample_norms[cols],
                              ref[rows], sample[cols], scratch)
            mask = scratch.block(scratch.mask, *dist.shape)
            ref_covered[rows] |= torch.le(dist, sample_radii[None, cols], out=mask).any(dim=1)
            sample_covered[cols] |= torch.le(dist, ref_radii[rows, None], out=mask).any(dim=0)
    return sample_covered.double().mean().item(), ref_covered.double().mean().item()
