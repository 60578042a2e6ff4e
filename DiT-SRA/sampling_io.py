"""What generate.py needs besides the model and its sampler: processes, checks, per-sample seeds, PNGs and the .npz.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.

Determinism: sample i depends only on (--global-seed, i), whatever the number of processes. Its CPU generator is
seeded with `global_seed * 1_000_000 + i` (`sample_seed`); generate.py draws from it, in this order, the initial latent
(4, h, w), the label and then every step's noise. torch's CPU generator keeps only the low 32 bits of a seed, so the
seeds stay below 2**32: --global-seed in 0..4293 and at most 1,000,000 samples per seed, which keeps every
(seed, index) stream distinct. Batches are the consecutive indices [b B, (b + 1) B), B = --per-proc-batch-size (the
last batch padded with indices >= N that are computed but not saved), so every batch holds the same rows on any number
of processes.

Resume: batches whose PNGs all exist and decode as RGB images of the right size are skipped; the others are dealt
round-robin to the processes again. The .npz is written once all N PNGs are valid.
"""
import argparse
import contextlib
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from utils import (RELEASED_CHECKPOINTS, UserError, check_shared_folder, check_writable, checkpoint_file,
                   compile_by_default, compile_prerequisite_problem, error_reason, load_checkpoint, load_vae,
                   load_weights, model_state_dict, with_own_head)

SEED_STRIDE = 1_000_000  # sample i of seed s uses generator seed s * SEED_STRIDE + i (see the module docstring)
MAX_GLOBAL_SEED = (2 ** 32 - SEED_STRIDE) // SEED_STRIDE  # 4293: torch's CPU generator keeps 32 bits of a seed
LATENT_CHANNELS = 4
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_flags(p, models, released_defaults, precision_note):
    """Adds the flags every generate.py has to the ArgumentParser `p`: the checkpoint, output, VAE, batch, sample count,
    seed, attention and precision switches, the launcher's --local-rank (and the released --world_size and --dist_url,
    accepted without effect), and --model (choices: the registry `models`), --num-classes and --qk-norm, whose help
    names their `released_defaults`. `precision_note` says what --precision leaves in full precision."""
    p.add_argument("--ckpt", required=True,
                   help="training checkpoint (its 'ema' weights) or a bare state dict; or a released name, "
                        f"{' / '.join(RELEASED_CHECKPOINTS)}, downloaded once into the Hugging Face cache")
    p.add_argument("--sample-dir", default="samples", help="parent folder of the PNG folder and the .npz")
    p.add_argument("--model", choices=sorted(models), default=None,
                   help=f"default: the checkpoint's, else {released_defaults['model']}")
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"default: the checkpoint's, else {released_defaults['num_classes']}")
    p.add_argument("--vae", default="ema", help="ema | mse | hub name | local folder of a diffusers AutoencoderKL")
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=True,
                   help="the fused attention kernel: the same attention up to rounding (the released generate.py ran "
                        "without it)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help=f"default: the checkpoint's, else {'on' if released_defaults['qk_norm'] else 'off'}")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (faster, slightly less exact); cuDNN convolutions keep "
                        "PyTorch's default (TF32 on), as released")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help=f"autocast dtype of the model calls; {precision_note}")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model call (slower start, faster steps); default: on with CUDA, off on CPU")
    p.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="set by `python -m torch.distributed.launch`; LOCAL_RANK in the environment wins")
    for flag in ("--world_size", "--dist_url"):
        p.add_argument(flag, default=None, help="accepted as the released generate.py does, without effect: the "
                                                "processes come from torchrun's environment (WORLD_SIZE, MASTER_ADDR)")


def check_common_flags(args):
    """Checks the flags every generate.py has (resolution, batch size, sample count, classes, seed); UserError."""
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not a positive multiple of 8 (the VAE's downsampling)")
    for flag, value in (("--per-proc-batch-size", args.per_proc_batch_size),
                        ("--num-fid-samples", args.num_fid_samples), ("--num-classes", args.num_classes)):
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    if not 0 <= args.global_seed <= MAX_GLOBAL_SEED:
        raise UserError(f"--global-seed {args.global_seed} is outside 0..{MAX_GLOBAL_SEED} (seeds of sample i are "
                        f"global_seed * {SEED_STRIDE:_} + i and must stay below 2**32)")
    if num_batches(args) * args.per_proc_batch_size > SEED_STRIDE:
        raise UserError(f"--num-fid-samples {args.num_fid_samples} with --per-proc-batch-size "
                        f"{args.per_proc_batch_size} needs more than {SEED_STRIDE:_} sample seeds per global seed")


# ---------------------------------------------------------------------------------------------- processes

@dataclass
class Processes:
    """This process's place among the torchrun processes (one: rank 0 of 1, no process group) and its device."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def any_failed(self, failed):
        """True on every process if `failed` is true on any of them (one collective)."""
        if self.world_size == 1:
            return failed
        flag = torch.tensor([int(failed)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def all_gather(self, items):
        """The concatenation of every process's list `items`, in rank order."""
        if self.world_size == 1:
            return list(items)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, list(items))
        return [item for part in gathered for item in part]


def init_processes(local_rank_flag=None):
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one process) and joins the process group.

    local_rank_flag: --local-rank, which `python -m torch.distributed.launch` passes; LOCAL_RANK wins when both exist."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag or 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                            "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        except (RuntimeError, ValueError) as e:
            reason = error_reason(e)
            raise UserError(f"WORLD_SIZE={world_size}, but torch.distributed ({backend}) cannot start: {reason}; "
                            "launch with `torchrun --nproc_per_node N generate.py ...`") from None
    return Processes(rank, world_size, device)


def run_on_processes(generate, args, weights):
    """generate(args, procs, weights) on this process, with TF32 matmuls as --tf32 says, in the torchrun process group
    if there is one (utils.run_main destroys it however the run ends)."""
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # cuDNN keeps PyTorch's default (TF32 on), as released
    generate(args, init_processes(args.local_rank), weights)


# ---------------------------------------------------------------------------------------------- setup

def sample_folder_name(args, settings):
    """`{exp}-{model}-{ckpt stem}-size-{res}-vae-{vae}-cfg-{cfg}-seed-{seed}-{settings}`, then `-classes-{n}` when
    --num-classes is not 1000; `{exp}-` only for a checkpoint in train.py's `{exp}/checkpoints/`.

    Not the released name (`{exp}-{ckpt stem}-{res}-vae-{vae}-cfg-{cfg}-seed-{seed}`, SiT's ending in `-{mode}`), which
    names too little for a resume: a run with other steps, guidance interval, path, sampler or precision would reuse
    the folder and keep the PNGs of the first. Ours is the original DiT's sample_ddp.py name (model and checkpoint),
    with the released experiment name in front, so that step-N.pt of two experiments never share a folder, and
    `settings`, the sampler's settings that change the pixels. Switches that change only the rounding (--tf32,
    --fused-attn, the batch size) are left out, as in the released name."""
    def clean(text):
        return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")

    ckpt = Path(args.ckpt).resolve()
    experiment = f"{clean(ckpt.parent.parent.name)}-" if ckpt.parent.name == "checkpoints" else ""
    vae = clean(Path(args.vae.rstrip("/")).name)  # a local folder or hub name shortened to its last part
    name = (f"{experiment}{clean(args.model)}-{clean(ckpt.stem)}-size-{args.resolution}-vae-{vae}-"
            f"cfg-{args.cfg_scale}-seed-{args.global_seed}-{settings}")
    if args.num_classes != 1000:
        name += f"-classes-{args.num_classes}"
    return name


@dataclass
class Weights:
    """The weights to sample with (a state dict) and where they came from, for error messages."""
    state_dict: dict
    trained_with: str


def fill_unset_flags(args, saved_args, released_defaults):
    """Sets each flag of `released_defaults` that the command line left unset (None) to the training checkpoint's
    value (`saved_args`, an argparse.Namespace, or None for a bare state dict) or, failing that, to the released
    generate.py's default. Returns args."""
    for name, default in released_defaults.items():
        if getattr(args, name) is None:
            value = getattr(saved_args, name, None)
            setattr(args, name, default if value is None else value)
    return args


def read_checkpoint(args, released_defaults, models):
    """Loads --ckpt (a path, or a released name: utils.checkpoint_file) and fills the unset flags from it
    (`fill_unset_flags`), a released checkpoint's known settings (utils.RELEASED_CHECKPOINTS) coming before the
    released generate.py's defaults. Returns its Weights; the rest of the checkpoint (the training weights, the
    optimizer) is not kept. A released name of a model not in `models` (this tree's) is refused before its download."""
    checkpoint = load_checkpoint(checkpoint_file(args.ckpt, "--ckpt", models), "--ckpt")
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(saved, dict):  # args saved as vars(args)
        saved = argparse.Namespace(**saved)
    saved = saved if isinstance(saved, argparse.Namespace) else None
    known = RELEASED_CHECKPOINTS.get(Path(args.ckpt).name, {})
    fill_unset_flags(args, saved, {name: known.get(name, default) for name, default in released_defaults.items()})
    return Weights(model_state_dict(checkpoint), trained_with(saved))


def trained_with(saved):
    """' (the checkpoint was trained with --model ...)' from a training checkpoint's args (an argparse.Namespace), or
    '' (None: a bare state dict)."""
    if saved is None:
        return ""
    flags = [f"--{name.replace('_', '-')} {getattr(saved, name)}" for name in ("model", "resolution", "num_classes")
             if hasattr(saved, name)]
    return f" (the checkpoint was trained with {' '.join(flags)})" if flags else ""


def build_model(args, factories, device, weights):
    """factories[--model] with the checkpoint's Weights, in eval mode on `device`."""
    state_dict = weights.state_dict
    # Checkpoints trained with class dropout hold a null row (id num_classes) in the label table, the released ones
    # included; a table of exactly num_classes rows was trained without it and cannot be guided.
    table = state_dict.get("y_embedder.embedding_table.weight")
    null_row = not (isinstance(table, torch.Tensor) and table.shape[0] == args.num_classes)
    if args.cfg_scale > 1 and not null_row:
        raise UserError(f"--ckpt {args.ckpt} has no null class (trained without class dropout): "
                        f"--cfg-scale {args.cfg_scale} needs one; use --cfg-scale 1")
    try:
        model = factories[args.model](input_size=args.resolution // 8, num_classes=args.num_classes,
                                      class_dropout_prob=0.1 if null_row else 0.0, fused_attn=args.fused_attn,
                                      qk_norm=args.qk_norm)
    except ValueError as e:
        raise UserError(f"--model {args.model} --resolution {args.resolution}: {e}") from None
    hint = f"--model {args.model} --resolution {args.resolution} --num-classes {args.num_classes}"
    try:
        load_weights(model, with_own_head(model, state_dict), f"--ckpt {args.ckpt}", hint)
    except UserError as e:
        raise UserError(f"{e}{weights.trained_with}") from None
    return cast_for_autocast(model.to(device).eval().requires_grad_(False), args.precision)


def prepare(args, procs, factories, folder, weights):
    """Every check that can fail, before any sampling: the architecture against the weights, VAE, writable output
    folder that every process sees.

    Returns (model, vae). A failure on any process stops all of them with a UserError.
    """
    error, result = None, None
    try:
        model = build_model(args, factories, procs.device, weights)
        vae = load_vae(args.vae, procs.device)
        check_writable(folder, "--sample-dir")
        result = model, vae
    except UserError as e:
        error = e
    # Agree before anyone samples: a process that failed alone would leave the others waiting at the barrier.
    if procs.any_failed(error is not None):
        raise error or UserError("another process failed its checks (its error is printed above)")
    if procs.world_size > 1:  # rank 0 reads every process's PNGs for the .npz
        check_shared_folder(folder, "--sample-dir", procs.rank, procs.all_gather, procs.barrier)
    return result


def autocast_call(fn, device, precision):
    """fn(*args, **kwargs) under autocast to `precision` (fp32: plain), its output cast to float32."""
    dtype = PRECISIONS[precision]

    def call(*args, **kwargs):
        context = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with context:
            return fn(*args, **kwargs).float()
    return call


def compile_call(fn, device, enabled):
    """fn itself, or fn through torch.compile when `enabled` (--compile; None: on CUDA only).

    One graph per input shape (dynamic=False, fullgraph=True): a sampling run has at most two, the batch with and
    without the CFG-doubled rows, each compiled on its first call. Where torch.compile cannot work (no Triton for the
    GPU, no C++ compiler for the CPU, a graph it cannot capture) the run stops with a UserError naming --no-compile:
    never an eager fallback.
    """
    if not (compile_by_default(device) if enabled is None else enabled) or torch._dynamo.config.disable:
        return fn  # config.disable: TORCH_COMPILE_DISABLE=1, torch's own off switch (fullgraph would make it an error)
    problem = compile_prerequisite_problem(device)
    if problem:
        raise UserError(f"--compile: {problem}; use --no-compile")
    # Past the recompile limit dynamo would run the call eagerly without a word; fail instead.
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    compiled = torch.compile(fn, dynamic=False, fullgraph=True)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            reason = error_reason(e)[:200]
            raise UserError(f"--compile: torch.compile failed ({reason}); use --no-compile") from None
    return call


def cast_for_autocast(model, precision):
    """Casts, once, the weights that autocast casts at every call (those of Linear and Conv2d layers) to `precision`.

    Autocast runs these layers on weights cast to its dtype and passes tensors already in that dtype through, so under
    `autocast_call` the model computes the same numbers bit for bit without converting every weight again at every
    sampling step (autocast caches casts only of weights that require grad). Returns the model; fp32 leaves it as is.
    """
    dtype = PRECISIONS[precision]
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------- seeds

class RowGenerators:
    """One CPU torch.Generator per batch row, so row k's draws depend only on its own seed and never on which other
    rows share the batch (or on the device: the draws are made on the CPU and moved)."""

    def __init__(self, seeds, device):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.device = device
        self._host = self._copied = None  # fill_normal's pinned buffer and the event of its last copy to the GPU

    def randn(self, shape, dtype=torch.float32):
        """(rows, *shape) standard normal draws, row k from generator k."""
        return self._to_device(torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators]))

    def randint(self, high):
        """(rows,) long labels in [0, high), row k from generator k."""
        return self._to_device(torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators]))

    def _to_device(self, draws):
        if self.device.type == "cuda":
            return draws.pin_memory().to(self.device, non_blocking=True)
        return draws.to(self.device)

    def fill_normal(self, out):
        """Fills out (rows, ...), on self.device, with the draws randn(out.shape[1:]) would give, and returns it: the
        samplers' `step_noise`, which allocates nothing after its first call.

        For a GPU the rows are drawn into one pinned host buffer and copied asynchronously, so the host draws the next
        step's noise while the GPU still runs the model; the buffer is rewritten only once its last copy has ended.
        """
        draws = self._host_buffer(out) if out.device.type == "cuda" else out
        for row, generator in zip(draws, self.generators):
            row.normal_(generator=generator)
        if draws is not out:
            out.copy_(draws, non_blocking=True)
            self._copied.record()
        return out

    def _host_buffer(self, out):
        """A pinned host tensor like out, the same one at every call, returned once its last copy has ended."""
        if self._host is None or self._host.shape != out.shape or self._host.dtype != out.dtype:
            self._host, self._copied = torch.empty(out.shape, dtype=out.dtype, pin_memory=True), torch.cuda.Event()
        self._copied.synchronize()
        return self._host


def sample_seed(global_seed, index):
    """The generator seed of sample `index`: global_seed * 1_000_000 + index (< 2**32, distinct for every pair)."""
    return global_seed * SEED_STRIDE + index


def num_batches(args):
    return math.ceil(args.num_fid_samples / args.per_proc_batch_size)


def batch_indices(batch, batch_size):
    """The sample indices of batch b: range(b * B, (b + 1) * B)."""
    return range(batch * batch_size, (batch + 1) * batch_size)


# ---------------------------------------------------------------------------------------------- files

def png_path(folder, index):
    return Path(folder) / f"{index:06d}.png"


def read_png(path, size):
    """uint8 (size, size, 3) of the PNG at `path`, or None if it is missing, unreadable, truncated or another size."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a half-written file fails here, not only at the header
            if image.format != "PNG" or image.mode != "RGB" or image.size != (size, size):
                return None
            return np.asarray(image)
    except Exception:  # any decoding failure (truncation, bad chunk CRC, not an image) means: generate it again
        return None


def save_png_atomic(image, path):
    """Writes uint8 (H, W, 3) to a temporary file and renames it over `path`: a killed process leaves no half PNG.

    No fsync per file (50,000 of them would be slow on network disks); a file damaged by a crash of the machine
    fails `read_png` and is generated again on resume."""
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per index, so a fixed name; a rerun reuses it
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def batch_complete(folder, indices, num_samples, size):
    """Whether every saved index (< num_samples) of a batch has a valid PNG."""
    return all(read_png(png_path(folder, i), size) is not None for i in indices if i < num_samples)


def write_npz_atomic(path, rows, shape):
    """Writes the file `np.savez(path, arr_0=a)` would write for the uint8 array `a` of `shape`, from an iterator over
    a's rows, without holding `a` (50,000 images at 512 px are 39 GB): a stored zip entry with force_zip64, as numpy's
    savez does. Written to a temporary file, fsynced, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": tuple(shape)}
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array_header_1_0(entry, header)
                    for row in rows:
                        entry.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_all_pngs(folder, num_samples, size, progress):
    """Yields the uint8 (size, size, 3) images 0..num_samples-1 in order; UserError if one is missing or invalid."""
    for i in tqdm(range(num_samples), desc="npz", disable=not progress):
        image = read_png(png_path(folder, i), size)
        if image is None:
            raise UserError(f"{png_path(folder, i)} is missing or unreadable; rerun the same command to regenerate it")
        yield image


# ---------------------------------------------------------------------------------------------- the run

def pending_batches(args, procs, folder):
    """The batches still to generate, as this process's share: all incomplete batches, dealt round-robin.

    On a fresh run this is batches rank, rank + W, ...; on a resume the left-over batches are dealt again so that
    every process gets its share of them. Each process checks the PNGs of every W-th batch only.
    Returns (this process's batches, the number of incomplete batches on all processes)."""
    batch_size = args.per_proc_batch_size
    checked = range(procs.rank, num_batches(args), procs.world_size)
    incomplete = [b for b in checked
                  if not batch_complete(folder, batch_indices(b, batch_size), args.num_fid_samples, args.resolution)]
    everyone = sorted(procs.all_gather(incomplete))
    return everyone[procs.rank::procs.world_size], len(everyone)


def write_samples(args, procs, folder, sample_batch):
    """Generates the missing PNGs of `folder` with sample_batch(indices) -> uint8 (len(indices), H, W, 3), then
    (rank 0, once every process is done) writes folder.npz with arr_0 uint8 (N, H, W, 3) in index order."""
    mine, left = pending_batches(args, procs, folder)
    total = num_batches(args)
    if procs.is_main:
        print(f"{folder}: {args.num_fid_samples} samples in {total} batches of {args.per_proc_batch_size}, "
              f"{total - left} already done, {left} to generate on {procs.world_size} process(es)")
    for batch in tqdm(mine, desc="sampling", disable=not procs.is_main):
        indices = batch_indices(batch, args.per_proc_batch_size)
        images = sample_batch(indices)
        for i, image in zip(indices, images):
            if i < args.num_fid_samples:  # the padding of the last batch is not saved
                save_png_atomic(image, png_path(folder, i))
    procs.barrier()
    if procs.is_main:
        npz = folder.with_name(f"{folder.name}.npz")
        shape = (args.num_fid_samples, args.resolution, args.resolution, 3)
        write_npz_atomic(npz, read_all_pngs(folder, args.num_fid_samples, args.resolution, True), shape)
        print(f"saved {npz} with arr_0 of shape {shape} (uint8)")
