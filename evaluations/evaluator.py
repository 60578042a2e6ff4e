"""Scores a sample batch against a reference batch with the ADM suite's Inception Score, FID, sFID, Precision and
Recall, in PyTorch (openai/guided-diffusion's evaluations/evaluator.py needs TensorFlow 1-style graphs).

    python evaluations/evaluator.py VIRTUAL_imagenet256_labeled.npz SAMPLES.npz --device cuda \
        [--batch-size 64] [--inception-weights PATH] [--cache-dir DIR] [--save-stats OUT.npz] [--json OUT.json]

Both files hold `arr_0`, uint8 images (N, H, W, 3) of any size (the network resizes them to 299), e.g. the .npz of
gen.sh. Precomputed `mu, sigma, mu_s, sigma_s` stored in either file are used for FID and sFID, as the suite does;
the images give the Inception Score, precision and recall. Prints the suite's five lines (`Inception Score: X`, `FID: X`, `sFID: X`,
`Precision: X`, `Recall: X`) on stdout, everything else on stderr. See README.md.
"""
import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import metrics
from errors import UserError, device_from_flag, run_main
from inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures, default_weights_path
from npz_io import NpzImages, read_statistics

JSON_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")
PAPER_SAMPLES = 50_000  # what the paper's figures are computed from


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ref_batch", type=Path, help="reference batch .npz (arr_0, optionally mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample_batch", type=Path, help="sample batch .npz (arr_0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cpu, cuda:1, ...")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help=f"torch-fidelity's Inception weights (default: {default_weights_path()}, downloaded if missing)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="keep the reference batch's activations here; a later run against the same file reads them")
    p.add_argument("--save-stats", type=Path, default=None,
                   help="write mu, sigma, mu_s, sigma_s of the sample batch's images here (a reference batch's keys)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the five figures here, with the weights' SHA-256, versions and sample counts")
    p.add_argument("--split-size", type=int, default=5000, help="samples per Inception Score split (the suite's 5000)")
    p.add_argument("--unverified-weights", action="store_true",
                   help="accept Inception weights whose SHA-256 is not the published one (for tests with random "
                        "weights: the figures are then not the suite's)")
    return p.parse_args(argv)


def check_args(args):
    """UserError naming the flag or file for what can be checked before the network is loaded; warnings on stderr.
    Returns the statistics stored in (reference, sample) batch, each a dict or None."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.split_size < 1:
        raise UserError(f"--split-size must be >= 1, got {args.split_size}")
    device_from_flag(args.device)
    for flag, path in (("--save-stats", args.save_stats), ("--json", args.json)):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"{flag} {path}: the folder {path.parent} does not exist")
    with NpzImages(args.ref_batch) as ref, NpzImages(args.sample_batch) as sample:
        for batch in (ref, sample):
            if len(batch) <= metrics.K_NEIGHBOURS:
                raise UserError(f"{batch.path}: {len(batch)} images; precision/recall need more than "
                                f"{metrics.K_NEIGHBOURS}")
        if len(sample) < args.split_size:
            print(f"warning: {sample.path}: {len(sample)} samples are fewer than one Inception Score split of "
                  f"{args.split_size} (--split-size): scored as one split of {len(sample)}, as the suite does",
                  file=sys.stderr)
        if len(sample) < PAPER_SAMPLES:
            print(f"warning: {sample.path}: {len(sample)} samples; figures from fewer than {PAPER_SAMPLES:,} are not "
                  f"comparable with the paper's", file=sys.stderr)
    return read_statistics(args.ref_batch, POOL_DIM, SPATIAL_DIM), read_statistics(args.sample_batch, POOL_DIM,
                                                                                   SPATIAL_DIM)


def read_ahead(iterator):
    """Yields the items (never None) of iterator, getting the next one in a thread while the caller works on the
    current one: reading a batch from the zip (50 MB for 64 images at 512 px) overlaps the device's work."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(next, iterator, None)
        while (item := pending.result()) is not None:
            pending = reader.submit(next, iterator, None)
            yield item


def compute_activations(path, features, batch_size):
    """pool (N, 2048) and spatial (N, 2023) float32 numpy activations of a .npz's arr_0, read batch by batch."""
    with NpzImages(path) as images:
        pool = np.empty((len(images), POOL_DIM), dtype=np.float32)
        spatial = np.empty((len(images), SPATIAL_DIM), dtype=np.float32)
        for start, batch in tqdm(read_ahead(images.batches(batch_size)), total=math.ceil(len(images) / batch_size),
                                 desc=f"Inception {path.name}", unit="batch"):
            batch_pool, batch_spatial = features(batch)
            pool[start:start + len(batch)] = batch_pool.cpu().numpy()
            spatial[start:start + len(batch)] = batch_spatial.cpu().numpy()
    return pool, spatial


def batch_statistics(pool, spatial):
    """A batch's FID statistics under the keys of a reference batch: mu (2048,), sigma, mu_s (2023,), sigma_s."""
    (mu, sigma), (mu_s, sigma_s) = metrics.statistics(pool), metrics.statistics(spatial)
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def cache_file(cache_dir, ref_path, weights_sha256):
    """The activation cache of one reference batch and one weights file: keyed by the reference's path and the
    checksum of its arr_0 (so a rewritten file is a new entry), and the weights file's SHA-256."""
    with NpzImages(ref_path) as images:
        ref_key = (str(ref_path.resolve()), images.crc32, images.shape)
    key = json.dumps([ref_key, weights_sha256])
    return cache_dir / f"{ref_path.stem}-inception-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def reference_activations(args, features):
    """The reference batch's activations, from --cache-dir when they are there (then written there otherwise)."""
    if args.cache_dir is None:
        return compute_activations(args.ref_batch, features, args.batch_size)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_file(args.cache_dir, args.ref_batch, features.sha256)
    if path.exists():
        print(f"reading cached reference activations from {path}", file=sys.stderr)
        with np.load(path) as cached:
            return cached["pool"], cached["spatial"]
    pool, spatial = compute_activations(args.ref_batch, features, args.batch_size)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, pool=pool, spatial=spatial)
    os.replace(tmp, path)
    print(f"cached reference activations in {path}", file=sys.stderr)
    return pool, spatial


def evaluate(args):
    """Returns (the five figures as a dict {line name: value} in the suite's order, a dict of what they came from)."""
    ref_stored, sample_stored = check_args(args)
    device = torch.device(args.device)
    # The suite's graph runs in float32; cuDNN and cuBLAS would otherwise use TF32 on recent GPUs.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    features = InceptionFeatures(args.inception_weights, device, verify=not args.unverified_weights)
    if args.unverified_weights:
        print(f"warning: Inception weights of SHA-256 {features.sha256[:8]}... accepted unverified "
              f"(--unverified-weights): the figures are not the suite's", file=sys.stderr)

    ref_pool, ref_spatial = reference_activations(args, features)
    pool, spatial = compute_activations(args.sample_batch, features, args.batch_size)
    computed = batch_statistics(pool, spatial) if sample_stored is None or args.save_stats is not None else None
    if args.save_stats is not None:
        np.savez(args.save_stats, **computed)
        print(f"saved the statistics of the images of {args.sample_batch} in {args.save_stats}", file=sys.stderr)
    sources = {}
    for role, path, stored in (("ref", args.ref_batch, ref_stored), ("sample", args.sample_batch, sample_stored)):
        sources[role] = "file" if stored is not None else "images"
        if stored is not None:
            print(f"FID and sFID use the statistics stored in {path} ({role} batch), not its images",
                  file=sys.stderr)
    ref_stats = ref_stored if ref_stored is not None else batch_statistics(ref_pool, ref_spatial)
    stats = sample_stored if sample_stored is not None else computed

    print("computing the metrics...", file=sys.stderr)
    probs = metrics.class_probabilities(pool, features.logits_weight)
    precision, recall = metrics.precision_recall(ref_pool, pool, device=device)
    results = {
        "Inception Score": metrics.inception_score(probs, args.split_size),
        "FID": metrics.frechet_distance(stats["mu"], stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sFID": metrics.frechet_distance(stats["mu_s"], stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"]),
        "Precision": precision,
        "Recall": recall,
    }
    provenance = {
        "ref_images": len(ref_pool), "sample_images": len(pool), "split_size": args.split_size,
        "ref_statistics": sources["ref"], "sample_statistics": sources["sample"],
        "inception_weights_sha256": features.sha256, "inception_weights_verified": not args.unverified_weights,
        "torch": torch.__version__, "torch_fidelity": importlib.metadata.version("torch-fidelity"),
    }
    return results, provenance


def main(argv=None):
    args = parse_args(argv)
    results, provenance = evaluate(args)
    for name, value in results.items():
        print(f"{name}: {value}")
    if args.json is not None:
        figures = dict(zip(JSON_KEYS, results.values(), strict=True))
        args.json.write_text(json.dumps({"ref_batch": str(args.ref_batch), "sample_batch": str(args.sample_batch),
                                         **figures, **provenance}, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
