"""What `generate.py --precision bf16` costs in sample quality, measured on the demo's trained SiT.

    bash demo.sh                                      # once: trains demo-out/exps/sra (the default budget)
    python demo/precision_check.py                    # then: three sample sets and their Frechet distances
    python demo/precision_check.py --out demo-out --num-samples 1000 --threads 2

Samples --num-samples class-balanced digits three times with the demo's sampler settings (SDE, its steps and CFG):
fp32 with --global-seed A, bf16 with the same seed A (the same initial noise, labels and step noise per sample), and
fp32 with another seed B. The demo's digit classifier (scoring.py, retrained on the training digits as the demo does)
gives the features of each set; the Frechet distance between the bf16 and fp32 sets of seed A is what bf16 changes,
the distance between the fp32 sets of seeds A and B is what drawing other samples changes (the noise floor of the
measure at this N). Samples go to OUT/precision/ (cleared first); prints a markdown table and writes it, with the
numbers, to OUT/precision.json.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import digits
import run_demo
import scoring

DEFAULT = run_demo.BUDGETS["default"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=run_demo.REPO / "demo-out", help="the demo's output folder")
    p.add_argument("--run", default="sra", help="the demo run whose last checkpoint is sampled (exps/RUN)")
    p.add_argument("--num-samples", type=run_demo.positive_int, default=1000,
                   help="samples per set, a multiple of 10 (class-balanced)")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1], metavar=("A", "B"),
                   help="--global-seed of the fp32 and bf16 sets (A) and of the second fp32 set (B)")
    p.add_argument("--sampling-steps", type=run_demo.positive_int, default=DEFAULT["sampling_steps"])
    p.add_argument("--cfg-scale", type=float, default=DEFAULT["cfg_scale"])
    p.add_argument("--classifier-epochs", type=run_demo.positive_int, default=DEFAULT["classifier_epochs"])
    p.add_argument("--classifier-seed", type=int, default=0, help="the demo's seed (its classifier's)")
    p.add_argument("--threads", type=run_demo.positive_int, default=1, help="CPU threads (OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    if args.num_samples % 10:
        p.error(f"--num-samples {args.num_samples}: use a multiple of 10 (as many samples of each digit)")
    if args.seeds[0] == args.seeds[1]:
        p.error(f"--seeds {args.seeds[0]} {args.seeds[1]}: the second fp32 set needs another seed")
    return args


def last_checkpoint(out, run):
    """The step-N.pt of exps/RUN/checkpoints with the largest N."""
    found = sorted((out / "exps" / run / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if not found:
        sys.exit(f"error: no {out / 'exps' / run / 'checkpoints'}/step-*.pt: run `bash demo.sh` (or --out) first")
    return found[-1]


def sample(args, ckpt, name, seed, precision):
    """generate.py's .npz of one set: uint8 (N, 32, 32, 3), sample i showing digit i % 10."""
    sample_dir = args.out / "precision" / name
    flags = ["--ckpt", ckpt, "--sample-dir", sample_dir, "--vae", args.out / "vae", "--per-proc-batch-size", 250,
             "--num-fid-samples", args.num_samples, "--mode", "sde", "--num-steps", args.sampling_steps,
             "--cfg-scale", args.cfg_scale, "--global-seed", seed, "--precision", precision, "--class-balanced"]
    print(f"\n$ {run_demo.command_line('SiT-SRA/generate.py', flags)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if subprocess.run([sys.executable, str(run_demo.REPO / "SiT-SRA/generate.py"), *map(str, flags)],
                      cwd=run_demo.REPO, env=env).returncode:
        sys.exit("error: generate.py failed (its message is above)")
    return np.load(next(sample_dir.glob("*.npz")))["arr_0"]


def main(args):
    torch.set_num_threads(args.threads)
    args.out = args.out.resolve()
    ckpt = last_checkpoint(args.out, args.run)
    # generate.py would resume from PNGs of an earlier checkpoint with the same name: start from nothing
    shutil.rmtree(args.out / "precision", ignore_errors=True)
    seed_a, seed_b = args.seeds
    started = time.time()
    sets = {"fp32, seed A": sample(args, ckpt, "fp32-a", seed_a, "fp32"),
            "bf16, seed A": sample(args, ckpt, "bf16-a", seed_a, "bf16"),
            "fp32, seed B": sample(args, ckpt, "fp32-b", seed_b, "fp32")}
    sampling_s = time.time() - started
    images, labels = digits.load_images(args.out / "data" / "images")
    net = scoring.train_classifier(images, labels, epochs=args.classifier_epochs, seed=args.classifier_seed)
    held_images, _ = digits.load_images(args.out / "held-out")
    _, real = scoring.predict(net, held_images[1::2])  # the demo's Frechet reference: every other held-out digit
    scored = {name: scoring.predict(net, samples) for name, samples in sets.items()}
    sample_labels = np.arange(args.num_samples) % 10
    fp32_a, bf16_a = sets["fp32, seed A"].astype(int), sets["bf16, seed A"].astype(int)
    result = {
        "checkpoint": str(ckpt), "num_samples": args.num_samples, "real_digits": len(real), "seeds": args.seeds,
        "sampling_steps": args.sampling_steps, "cfg_scale": args.cfg_scale, "sampling_s": round(sampling_s, 1),
        "frechet_bf16_vs_fp32_same_seeds": scoring.frechet_distance(scored["fp32, seed A"][1], scored["bf16, seed A"][1]),
        "frechet_fp32_vs_fp32_other_seeds": scoring.frechet_distance(scored["fp32, seed A"][1],
                                                                      scored["fp32, seed B"][1]),
        "bf16_vs_fp32_same_seeds_pixels": {"mean_abs_diff": float(np.abs(fp32_a - bf16_a).mean()),
                                           "identical_images": int(np.all(fp32_a == bf16_a, axis=(1, 2, 3)).sum())},
        "sets": {name: {"frechet_to_real_digits": scoring.frechet_distance(real, features),
                        "conditional_accuracy": float(np.mean(predicted == sample_labels))}
                 for name, (predicted, features) in scored.items()},
    }
    table = markdown(result)
    (args.out / "precision.json").write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    print(f"\n{table}\nwritten to {args.out / 'precision.json'}")


def markdown(result):
    """The README's table: the two distances, then each set's distance to real digits and its accuracy."""
    n = result["num_samples"]
    pixels = result["bf16_vs_fp32_same_seeds_pixels"]
    lines = [f"| Frechet distance (digit-classifier features, {n} samples per set) | |", "|---|---|",
             f"| bf16 vs fp32, same seeds | {result['frechet_bf16_vs_fp32_same_seeds']:.3g} |",
             f"| fp32 vs fp32, other seeds | {result['frechet_fp32_vs_fp32_other_seeds']:.3g} |",
             "", f"| set | Frechet distance to {result['real_digits']} real digits | conditional accuracy |",
             "|---|---|---|"]
    lines += [f"| {name} | {s['frechet_to_real_digits']:.2f} | {s['conditional_accuracy']:.1%} |"
              for name, s in result["sets"].items()]
    lines += ["", f"bf16 vs fp32, same seeds: mean absolute pixel difference {pixels['mean_abs_diff']:.2f} of 255, "
                  f"{pixels['identical_images']} of {n} images identical"]
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_args())
