"""Measures the images per second of the evaluator's Inception pass (resize to 299, network, both feature sets).

    python evaluations/bench_inception.py --device cuda --batch-size 64 [--inception-weights PATH] [--threads N]

Random 256 px uint8 images; one warm-up batch, then --batches timed batches. The weights' values do not change the
speed, so any file in torch-fidelity's format will do (--unverified-weights for one other than the published file).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from errors import UserError, run_main
from inception import InceptionFeatures


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=5, help="timed batches after one warm-up batch")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--inception-weights", type=Path, default=None)
    p.add_argument("--unverified-weights", action="store_true", help="accept weights of any SHA-256 (random ones)")
    args = p.parse_args()
    if min(args.batch_size, args.batches, args.resolution) < 1:
        raise UserError("--batch-size, --batches and --resolution must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False  # as the evaluator
    torch.backends.cuda.matmul.allow_tf32 = False
    features = InceptionFeatures(args.inception_weights, args.device, verify=not args.unverified_weights)
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.resolution, args.resolution, 3),
                                               dtype=np.uint8)

    def one_batch():
        pool, spatial = features(images)
        pool.cpu(), spatial.cpu()  # the evaluator copies both to the host; this also waits for the device

    one_batch()
    start = time.perf_counter()
    for _ in range(args.batches):
        one_batch()
    seconds = time.perf_counter() - start
    print(f"{args.device}, {torch.get_num_threads()} CPU threads, batch {args.batch_size}, {args.resolution} px: "
          f"{args.batches * args.batch_size / seconds:.2f} images/s")


if __name__ == "__main__":
    run_main(main)
