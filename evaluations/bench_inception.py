"""Measures the images per second of the evaluator's Inception pass (resize to 299, network, both feature sets).

    python evaluations/bench_inception.py --device cuda --batch-size 256 [--inception-weights PATH] [--threads N]
    python evaluations/bench_inception.py --device cuda --batch-size 256 --random-weights   # offline

Random 256 px uint8 images; one warm-up batch, then --batches timed batches. The weights' values do not change the
speed: --random-weights times a network of random weights (no file, no download), --unverified-weights accepts a
file other than the published one.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from errors import UserError, device_from_flag, run_main
from inception import InceptionFeatures, random_state_dict


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=5, help="timed batches after one warm-up batch")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--inception-weights", type=Path, default=None)
    p.add_argument("--unverified-weights", action="store_true", help="accept weights of any SHA-256")
    p.add_argument("--random-weights", action="store_true", help="random weights instead of a file (same speed)")
    args = p.parse_args()
    if min(args.batch_size, args.batches, args.resolution) < 1:
        raise UserError("--batch-size, --batches and --resolution must be >= 1")
    if args.random_weights and (args.inception_weights or args.unverified_weights):
        raise UserError("--random-weights uses no file: drop --inception-weights and --unverified-weights")
    device = device_from_flag(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False  # as the evaluator
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.random_weights:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(random_state_dict(), f"{tmp}/random.pth")
            features = InceptionFeatures(f"{tmp}/random.pth", device, verify=False)
    else:
        features = InceptionFeatures(args.inception_weights, device, verify=not args.unverified_weights)
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
    weights = "random weights" if args.random_weights else features.sha256[:8]
    print(f"Inception pass on {device} ({torch.get_num_threads()} CPU threads, batch {args.batch_size}, "
          f"{args.resolution} px, {weights}): {args.batches * args.batch_size / seconds:.2f} images/s")


if __name__ == "__main__":
    run_main(main)
