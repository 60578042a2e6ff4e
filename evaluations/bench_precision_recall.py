"""Times the evaluator's precision/recall (k = 3, the suite's float16 distances) on random pool_3-like features.

    python evaluations/bench_precision_recall.py --device cuda --ref 50000 --samples 50000
    python evaluations/bench_precision_recall.py --device cpu --ref 3000 --samples 3000 --threads 2
    python evaluations/bench_precision_recall.py --device cpu --threads 2 \
        --suite-dir ~/guided-diffusion --suite-python ~/tf-env/bin/python

Features (N, 2048) of non-negative values with |x|^2 of about 400, like Inception's pool_3 (where float16 rounding
matters); one untimed warm-up run, then the fastest of --repeats timed runs. Prints one line with the seconds. With
--suite-dir, the suite's own TensorFlow code (run by --suite-python, through suite_precision_recall.py) is timed on
the same features in the same run, and a second line gives its time, the ratio and whether the figures are equal.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import torch

import metrics
from errors import UserError, device_from_flag, run_main


def pool_like(n, dim, seed, device):
    """n features (n, dim) float32 on device: squares of uniform [0, 1) values, |x|^2 about dim / 5."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dim, generator=generator) ** 2).to(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ref", type=int, default=3000, help="reference features")
    p.add_argument("--samples", type=int, default=3000, help="sample features")
    p.add_argument("--dim", type=int, default=2048, help="feature size (pool_3: 2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run; the fastest is printed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); also the suite's")
    p.add_argument("--suite-dir", type=Path, help="a checkout of openai/guided-diffusion: time its code too")
    p.add_argument("--suite-python", default=sys.executable, help="an interpreter with the suite's requirements")
    args = p.parse_args()
    if min(args.ref, args.samples) <= metrics.K_NEIGHBOURS or min(args.dim, args.repeats) < 1:
        raise UserError(f"--ref and --samples must be > {metrics.K_NEIGHBOURS}, --dim and --repeats >= 1")
    device = device_from_flag(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ref, sample = pool_like(args.ref, args.dim, 0, device), pool_like(args.samples, args.dim, 1, device)

    figures = metrics.precision_recall(ref, sample, device=device)  # .item() waits for the device
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics.precision_recall(ref, sample, device=device)
        seconds.append(time.perf_counter() - start)
    print(f"precision/recall {args.ref} x {args.samples} x {args.dim} on {device} ({torch.get_num_threads()} CPU "
          f"threads): {min(seconds):.3f} s (precision {figures[0]:.4f}, recall {figures[1]:.4f})")
    if args.suite_dir is not None:
        suite = time_suite(args, ref.cpu().numpy(), sample.cpu().numpy())
        samples_apart = round(abs(suite["precision"] - figures[0]) * args.samples)
        refs_apart = round(abs(suite["recall"] - figures[1]) * args.ref)
        equal = "equal" if samples_apart == refs_apart == 0 else \
            f"NOT equal: {samples_apart} samples and {refs_apart} reference points counted otherwise"
        print(f"the suite's code, same features: {suite['seconds']:.3f} s (precision {suite['precision']:.4f}, recall "
              f"{suite['recall']:.4f}); ours is {suite['seconds'] / min(seconds):.2f}x its speed, figures {equal}")


def time_suite(args, ref, sample):
    """The suite's timing JSON (seconds, precision, recall) from suite_precision_recall.py under --suite-python."""
    with tempfile.TemporaryDirectory() as folder:
        paths = [str(Path(folder) / name) for name in ("ref.npy", "sample.npy")]
        for path, features in zip(paths, (ref, sample)):
            np.save(path, features)
        script = Path(__file__).with_name("suite_precision_recall.py")
        cmd = [args.suite_python, str(script), str(args.suite_dir), *paths, "--repeats", str(args.repeats),
               "--threads", str(args.threads or 0)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        except OSError as e:
            raise UserError(f"--suite-python {args.suite_python}: {e.strerror}") from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("error: ")
        raise UserError(f"--suite-dir {args.suite_dir}: the suite's precision/recall failed: {last}")
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    run_main(main)
