"""Our train.py and generate.py against the released code's, each run unmodified as its users run it,
with the same flags on the same synthetic latents; prints one markdown table.

    bash benchmarks/vs_released.sh RELEASED_DIR          # SiT-XL/2, DiT-XL/2 training; SiT-XL/2 sampling on CUDA
    python benchmarks/vs_released.py RELEASED_DIR --models SiT-S/8 --batch-size 2 --train-steps 6 --warmup 2 \
        --mixed-precision no --num-workers 0 --sample-batch 2 --sample-batches 3 --sample-steps 2   # tiny, CPU

RELEASED_DIR is the user's own checkout of the released repository (its SiT-SRA/ and DiT-SRA/ are
run from there, never copied here). Everything else lives in --workdir (default: a temporary
folder, deleted afterwards unless --keep): synthetic latents in the real on-disk format
(vae-sd/dataset.json + (8, r/8, r/8) float32 .npy files), and a private Hugging Face cache holding
a tiny random diffusers AutoencoderKL under the hub names the released scripts load
(stabilityai/sd-vae-ft-ema and -mse), used with HF_HUB_OFFLINE=1, so nothing is downloaded.

Training: train.py of each tree (SiT-..., DiT-...) for --train-steps steps with the README's
flags (--mixed-precision, --batch-size per process, --block-out-s/-t: 8 and 20 for SiT-XL, 8 and
16 for DiT-XL, else depth/3 and 2 depth/3), sample grids and checkpoints pushed past the end (the
released train.py cannot save from one process: it reads `model.module`). The released train.py
accepts only 256 or 512 px (DiT: 256). Sampling (SiT only; the released generate.py asserts a
GPU, so on a CPU only ours runs): generate.py with gen.sh's SDE flags (CFG 1.8 on t <= 0.7) for
--sample-steps steps, --sample-batches batches of --sample-batch, from a checkpoint holding a
randomly initialised model's weights under "ema" (the speed does not depend on the values).

Every run goes through benchmarks/step_clock.py, which times the ticks of the script's own
progress bar (the end of each training step; the start of each sampling batch and the end of the
last). The table gives, per run, the median interval between ticks after the first --warmup
intervals (steps 2 to --warmup + 1; --sample-warmup batches), the images per second it implies
(global batch / median interval) and the ratio to the released run. Ours runs with its
defaults (on CUDA compiled, see train.py --compile), plus one row per --train-variant and
--sample-variant.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLOCK = REPO / "benchmarks" / "step_clock.py"
VAE_NAMES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
DEPTHS = {"XL": 28, "L": 24, "B": 12, "S": 12}  # the released model sizes
XL_BLOCK_OUT = {"SiT": (8, 20), "DiT": (8, 16)}  # the README's training commands
SNAPSHOT = "0" * 40  # the commit folder of the offline cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("released_dir", type=Path, help="a checkout of the released repository")
    p.add_argument("--released-python", default=sys.executable,
                   help="the Python of the released code's environment (it imports transformers; default: this one)")
    p.add_argument("--models", nargs="+", default=["SiT-XL/2", "DiT-XL/2"])
    p.add_argument("--resolution", type=int, default=256, choices=[256, 512], help="what the released train.py takes")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="fp16")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, through torchrun")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="training steps left out of the median")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=50, help="SDE steps per sampling batch (gen.sh: 250)")
    p.add_argument("--sample-batch", type=int, default=64, help="per process (gen.sh's)")
    p.add_argument("--sample-batches", type=int, default=4, help="batches per process (0: no sampling)")
    p.add_argument("--sample-warmup", type=int, default=1, help="sampling batches left out of the median")
    p.add_argument("--train-variant", action="append", default=[],
                   help="flags of one more training run of ours, e.g. --train-variant=--no-compile (repeatable)")
    p.add_argument("--sample-variant", action="append", default=[],
                   help="flags of one more sampling run of ours, e.g. --sample-variant='--precision bf16' (repeatable)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--keep", action="store_true", help="keep --workdir (logs, tick files)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--budget-s", type=int, default=None,
                   help="seconds for all runs: a run is cut off at the end of it, later runs are not started, and "
                        "the table says so (default: no limit)")
    args = p.parse_args(argv)
    for model in args.models:
        family, size = model.split("-")[0], model.split("-")[1].split("/")[0]
        if family not in XL_BLOCK_OUT or size not in DEPTHS:
            p.error(f"--models {model}: expected SiT-/DiT-{{XL,L,B,S}}/p (a model both repositories have)")
    for tree in ("SiT-SRA", "DiT-SRA"):
        if not (args.released_dir / tree / "train.py").is_file():
            p.error(f"{args.released_dir}: no {tree}/train.py; pass a checkout of the released repository")
    if args.warmup >= args.train_steps - 1 or (args.sample_batches and args.sample_warmup >= args.sample_batches):
        p.error("--warmup (--sample-warmup) must leave at least two steps (batches) to time")
    return args


def write_latents(root, num_items, resolution, num_classes=1000, seed=0):
    """The on-disk format of preprocessing's `encode`: vae-sd/dataset.json and (8, r/8, r/8) float32 mean and std."""
    rng = np.random.default_rng(seed)
    vae_dir = Path(root) / "vae-sd"
    labels = []
    for i in range(num_items):
        name = f"{i // 1000:05d}/img-mean-std-{i:08d}.npy"
        (vae_dir / name).parent.mkdir(parents=True, exist_ok=True)
        mean = 5 * rng.standard_normal((4, resolution // 8, resolution // 8)).astype(np.float32)
        std = rng.uniform(0.01, 0.1, size=mean.shape).astype(np.float32)
        np.save(vae_dir / name, np.concatenate([mean, std]))
        labels.append([name, int(rng.integers(num_classes))])
    (vae_dir / "dataset.json").write_text(json.dumps({"labels": labels}))
    return Path(root)


def offline_hub(cache):
    """A Hugging Face cache under `cache` serving a tiny random AutoencoderKL (8x downsampling, 4 latent channels)
    as each of VAE_NAMES; returns the environment that makes from_pretrained read it offline."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)
    for name in VAE_NAMES:
        repo = Path(cache) / "hub" / f"models--{name.replace('/', '--')}"
        vae.save_pretrained(repo / "snapshots" / SNAPSHOT)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(SNAPSHOT)
    return {"HF_HOME": str(cache), "HF_HUB_CACHE": str(Path(cache) / "hub"), "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "DIFFUSERS_OFFLINE": "1"}


def block_outs(model):
    """--block-out-s/-t of the README for the XL models, depth/3 and 2 depth/3 for smaller ones."""
    family, size = model.split("-")[0], model.split("-")[1].split("/")[0]
    depth = DEPTHS[size]
    return XL_BLOCK_OUT[family] if depth == 28 else (depth // 3, 2 * depth // 3)


def step_intervals(ticks_file, warmup):
    """Seconds between consecutive ticks after the first `warmup` intervals (a tick ends a step)."""
    ticks = [float(line) for line in Path(ticks_file).read_text().split()]
    return [b - a for a, b in zip(ticks, ticks[1:])][warmup:]


def summary(ticks_file, warmup, images_per_tick):
    """(images/s, median interval in ms, intervals timed) of one run's tick file."""
    intervals = step_intervals(ticks_file, warmup)
    if len(intervals) < 1:
        raise ValueError(f"{ticks_file}: fewer than {warmup + 2} ticks")
    median = statistics.median(intervals)
    return images_per_tick / median, 1000 * median, len(intervals)


def markdown_table(works):
    """works: [(work description, [(run name, (images/s, ms, n) or a reason it did not run)])]; the first run of a
    work that has numbers is the released one, against which the ratio is taken."""
    lines = ["| work | run | img/s | median step interval | vs released |", "|---|---|---|---|---|"]
    for work, runs in works:
        released = runs[0][1] if isinstance(runs[0][1], tuple) else None
        for i, (name, result) in enumerate(runs):
            label = work if i == 0 else ""
            if isinstance(result, tuple):
                ips, ms, n = result
                ratio = f"{ips / released[0]:.2f}x" if released else "-"
                lines.append(f"| {label} | {name} | {ips:.2f} | {ms:.1f} ms (median of {n}) | {ratio} |")
            else:
                lines.append(f"| {label} | {name} | - | {result} | - |")
    return "\n".join(lines)


class Runner:
    """Runs scripts under step_clock.py (through torchrun with --nproc) and keeps their logs and tick files."""

    def __init__(self, args, env, logs):
        self.args, self.env, self.logs = args, env, logs
        self.deadline = None if args.budget_s is None else time.monotonic() + args.budget_s

    def __call__(self, name, python, tree_dir, script, argv, ticks_total, warmup, images_per_tick):
        ticks, log = self.logs / f"{name}.ticks", self.logs / f"{name}.log"
        launch = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(self.args.nproc)] if self.args.nproc > 1 or script == "generate.py" else [python]
        cmd = [*launch, str(CLOCK), str(ticks), str(ticks_total), script, *argv]
        timeout = self.args.timeout
        if self.deadline is not None:
            timeout = min(timeout, int(self.deadline - time.monotonic()))
            if timeout < 5:
                return f"not run: the --budget-s {self.args.budget_s} s were spent"
        print(f"[{name}] cd {tree_dir} && {' '.join(cmd)}", file=sys.stderr, flush=True)
        with open(log, "w") as out:
            try:
                code = subprocess.run(cmd, cwd=tree_dir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return f"cut off after {timeout} s ({log})"
        if code != 0:
            return f"failed, exit {code} ({log})"
        try:
            return summary(ticks, warmup, images_per_tick)
        except (OSError, ValueError) as e:
            return f"no timing: {e}"


def training_argv(args, model, data_dir, out_dir):
    s, t = block_outs(model)
    never = str(args.train_steps + 1)  # sample grids and step checkpoints after the end
    argv = ["--model", model, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
            "--mixed-precision", args.mixed_precision, "--block-out-s", str(s), "--block-out-t", str(t),
            "--max-train-steps", str(args.train_steps), "--checkpoint-steps", never, "--num-workers",
            str(args.num_workers), "--data-dir-train", str(data_dir), "--output-dir", str(out_dir), "--exp-name", "run",
            "--seed", "0"]
    return argv + (["--sample-steps", never] if model.startswith("SiT") else [])


def sampling_argv(args, model, ckpt, sample_dir):
    return ["--model", model, "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--resolution",
            str(args.resolution), "--vae", "ema", "--per-proc-batch-size", str(args.sample_batch), "--num-fid-samples",
            str(args.sample_batch * args.sample_batches * args.nproc), "--mode", "sde", "--num-steps",
            str(args.sample_steps), "--cfg-scale", "1.8", "--guidance-high", "0.7", "--path-type", "linear",
            "--global-seed", "0"]


def random_checkpoint(model, resolution, path):
    """{"ema": state dict} of a randomly initialised `model` (ours; the parameter names are the released ones)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import import_tree

    (models,) = import_tree(model, "models")
    net = getattr(models, f"{model.split('-')[0]}_models")[model](input_size=resolution // 8, num_classes=1000,
                                                                 class_dropout_prob=0.1)
    torch.save({"ema": net.state_dict()}, path)
    return path


def main(args):
    import torch

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vs_released_"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **offline_hub(work / "hf")}
    run = Runner(args, env, logs)
    global_batch = args.batch_size * args.nproc
    data = write_latents(work / "data", global_batch * (args.train_steps + 1), args.resolution)
    cuda = torch.cuda.is_available()
    works = []
    for model in args.models:
        family, tag = model.split("-")[0], model.replace("/", "_")
        trees = {"released": args.released_dir / f"{family}-SRA", "ours": REPO / f"{family}-SRA"}
        pythons = {"released": args.released_python, "ours": sys.executable}
        s, t = block_outs(model)
        runs = []
        for name, extra in [("released", []), ("ours", []), *(("ours " + v, v.split()) for v in args.train_variant)]:
            out = work / "runs" / f"train_{tag}_{len(runs)}"
            argv = training_argv(args, model, data, out) + extra
            runs.append((name, run(f"train_{tag}_{len(runs)}", pythons[name.split()[0]], trees[name.split()[0]], "train.py", argv,
                                   args.train_steps, args.warmup, global_batch)))
        works.append((f"{model} train, {args.resolution} px, {args.mixed_precision}, batch {global_batch}, blocks "
                      f"{s}->{t}, {args.train_steps} steps", runs))
        if family != "SiT" or args.sample_batches == 0:
            continue
        ckpt = random_checkpoint(model, args.resolution, work / f"{tag}.pt")
        runs = []
        for name, extra in [("released", []), ("ours", []), *(("ours " + v, v.split()) for v in args.sample_variant)]:
            if name == "released" and not cuda:
                runs.append((name, "not run: the released generate.py asserts a GPU"))
                continue
            argv = sampling_argv(args, model, ckpt, work / "runs" / f"sample_{tag}_{len(runs)}") + extra
            runs.append((name, run(f"sample_{tag}_{len(runs)}", pythons[name.split()[0]], trees[name.split()[0]],
                                   "generate.py", argv, args.sample_batches, args.sample_warmup,
                                   args.sample_batch * args.nproc)))
        works.append((f"{model} sampling, SDE {args.sample_steps} steps, CFG 1.8 on t <= 0.7, batch "
                      f"{args.sample_batch * args.nproc}", runs))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; released code: "
          f"{args.released_dir.resolve()}; median step interval after {args.warmup} training steps "
          f"({args.sample_warmup} sampling batches)\n")
    print(markdown_table(works))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = any(isinstance(r, str) and not r.startswith("not run: the released") for _, runs in works for _, r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
