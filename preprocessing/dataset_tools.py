"""Prepares ImageNet for SRA training: `convert` crops and resizes the images to PNG, `encode`
stores each image's SD-VAE posterior (mean and std) as the latents that train.py reads.

    python dataset_tools.py convert --source=IMAGENET/train --dest=OUT/images \\
        --resolution=256x256 --transform=center-crop-dhariwal
    python dataset_tools.py encode --source=OUT/images --dest=OUT/vae-sd
    torchrun --nproc_per_node 8 dataset_tools.py encode --source=OUT/images --dest=OUT/vae-sd

Then train with `--data-dir=OUT`. Both commands resume: rerun the same command after an
interruption and the outputs already written (and verified) are kept. See README.md.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from datetime import timedelta

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# Files of a class-folder tree that count as images (others, e.g. a README, are ignored).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
# What Pillow raises for a file it cannot decode (unknown format, truncated, corrupt, too large).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_DOWNSAMPLING = 8
LATENT_CHANNELS = 8  # 4 posterior means, then 4 posterior stds
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
DEFAULT_BATCH_SIZE = 64


class UserError(Exception):
    """An error the user can fix (a bad flag, a missing file): printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Files: atomic writes and read-only sources (a folder or a .zip)


@contextlib.contextmanager
def atomic_open(path):
    """Opens a temp file beside `path` for binary writing and moves it onto `path` on success.

    Readers (and a resumed run) therefore see either the whole file or none. The temp name is
    fixed per output, so a leftover from a killed run is overwritten when that output is redone.
    """
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        yield f
    os.replace(tmp, path)


def write_json(path, labels):
    """Writes `{"labels": labels}` atomically: the index of a dataset folder."""
    with atomic_open(path) as f:
        f.write(json.dumps({"labels": labels}).encode())


class Source:
    """Read-only view of a folder or a .zip: its files by relative path ('/'-separated)."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise UserError(f"--source {path}: no such file or folder")
        self.is_zip = os.path.isfile(path)
        if self.is_zip and not zipfile.is_zipfile(path):
            raise UserError(f"--source {path}: not a folder or a .zip")
        self.path = path
        self._zip = None
        self._zip_pid = None

    def files(self):
        """Sorted relative paths of every file."""
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                return sorted(name for name in z.namelist() if not name.endswith("/"))
        found = []
        for folder, _, names in os.walk(self.path):
            rel = os.path.relpath(folder, self.path)
            found += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in names]
        return sorted(found)

    def read(self, relpath):
        """The bytes of one file."""
        if not self.is_zip:
            with open(os.path.join(self.path, relpath), "rb") as f:
                return f.read()
        # One ZipFile per process: a handle inherited through fork shares its file offset.
        if self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(relpath)


def list_labelled_images(source, class_folders=True):
    """[(relative path, label int)] of the images of `source`, sorted by path.

    A top-level dataset.json ({"labels": [[relpath, label], ...]}) lists them. Otherwise, with
    `class_folders`, the source is an ImageNet-style tree: the label of `n01440764/x.JPEG` is the
    index of `n01440764` among the sorted top-level folders that hold images.
    """
    files = source.files()
    if "dataset.json" in files:
        return read_dataset_json(source)
    in_class = [f for f in files if "/" in f and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                and not is_hidden(f)]
    if not class_folders or not in_class:
        what = "and no class folders of images" if class_folders else "(run convert first)"
        raise UserError(f"--source {source.path}: no dataset.json {what}")
    classes = sorted({f.split("/", 1)[0] for f in in_class})
    label_of = {name: label for label, name in enumerate(classes)}
    return [(f, label_of[f.split("/", 1)[0]]) for f in in_class]


def is_hidden(relpath):
    """True for files a class-folder tree must not count: hidden ones and macOS zip metadata
    (a `__MACOSX/` folder would otherwise become class 0 and shift every label)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in relpath.split("/"))


def read_dataset_json(source):
    """The sorted (relpath, label) pairs of a source's dataset.json."""
    try:
        labels = json.loads(source.read("dataset.json"))["labels"]
        items = sorted((str(path), int(label)) for path, label in labels)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{source.path}/dataset.json: expected {{\"labels\": [[path, label], ...]}} ({e})") from e
    return items


# ----------------------------------------------------------------------------------------------
# convert: decode, crop and resize, write PNGs


def center_crop_box(img, crop_w, crop_h):
    """The central crop_w x crop_h region of `img`, offsets rounded down (as edm and ADM do)."""
    left, top = (img.width - crop_w) // 2, (img.height - crop_h) // 2
    return img.crop((left, top, left + crop_w, top + crop_h))


def center_crop(img, width, height):
    """edm's `center-crop`: the central square of side min(w, h), LANCZOS-resized to width x height."""
    side = min(img.size)
    return center_crop_box(img, side, side).resize((width, height), PIL.Image.LANCZOS)


def center_crop_wide(img, width, height):
    """The largest central region with the target aspect, LANCZOS-resized to width x height."""
    crop_w = max(1, min(img.width, round(img.height * width / height)))
    crop_h = max(1, min(img.height, round(img.width * height / width)))
    return center_crop_box(img, crop_w, crop_h).resize((width, height), PIL.Image.LANCZOS)


def center_crop_dhariwal(img, width, height):
    """ADM's ImageNet crop (square only): halve with BOX while the short side >= 2 * size, BICUBIC
    resize so the short side is the size (other side rounded), then take the central square."""
    assert width == height, "center-crop-dhariwal makes square images"
    size = width
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=PIL.Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=PIL.Image.BICUBIC)
    return center_crop_box(img, size, size)


TRANSFORMS = {"center-crop": center_crop, "center-crop-wide": center_crop_wide,
              "center-crop-dhariwal": center_crop_dhariwal}


def decode_rgb(data):
    """Decodes a whole image file (so a truncated one fails here) and converts it to RGB.

    This is Pillow's convert('RGB'): alpha (RGBA, LA, transparent palettes) is dropped, not
    composited over a background; grayscale, palette and CMYK use Pillow's conversions. EXIF
    orientation is ignored, as in the ImageNet pipelines of ADM and edm.
    """
    with PIL.Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def describe(error):
    """A short reason for a decoding failure (Pillow's own names a BytesIO object, not the file)."""
    if isinstance(error, PIL.UnidentifiedImageError):
        return "not an image Pillow can identify"
    return f"{type(error).__name__}: {error}"


def image_name(index):
    """Output name of image `index`: 1000 images per folder, e.g. 1234 -> 00001/img00001234.png."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def png_is_valid(path, size):
    """True if `path` is a complete RGB image of `size` (w, h): a finished output of convert."""
    try:
        with PIL.Image.open(path) as img:
            img.load()
            return img.size == size and img.mode == "RGB"
    except (FileNotFoundError, *DECODE_ERRORS):
        return False


class ConvertImages(Dataset):
    """Item i converts source image i and writes it; a DataLoader over it runs the conversion.

    Returns (reused, error): reused is True when a valid output was already there (resume);
    error is '' on success, else why the source image was skipped.
    """

    def __init__(self, source, relpaths, out_dir, transform, size):
        self.source, self.relpaths, self.out_dir = source, relpaths, out_dir
        self.transform, self.size = transform, size

    def __len__(self):
        return len(self.relpaths)

    def __getitem__(self, index):
        path = os.path.join(self.out_dir, image_name(index))
        if png_is_valid(path, self.size):
            return True, ""
        try:
            img = self.transform(decode_rgb(self.source.read(self.relpaths[index])), *self.size)
        except (FileNotFoundError, KeyError, *DECODE_ERRORS) as e:  # KeyError: a name missing from a zip
            return False, describe(e)
        buffer = io.BytesIO()
        # zlib level 1: lossless like the released tool's level 0, with far less disk for little CPU.
        img.save(buffer, format="png", compress_level=1)
        with atomic_open(path) as f:
            f.write(buffer.getvalue())
        return False, ""


def pack_zip(folder, names, dest):
    """Writes the files `names` of `folder` into the .zip `dest`, uncompressed, atomically.

    Fixed timestamps and permissions make the archive depend only on the files' contents.
    """
    with atomic_open(dest) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with open(os.path.join(folder, name), "rb") as src:
                z.writestr(info, src.read())


def convert(args):
    """The `convert` command. A .zip destination is assembled in `<dest>.partial/`, where an
    interrupted run resumes, and packed once every image is done."""
    if args.transform == "center-crop-dhariwal" and args.resolution[0] != args.resolution[1]:
        raise UserError("--transform center-crop-dhariwal needs a square --resolution")
    source = Source(args.source)
    items = list_labelled_images(source)[: args.max_images]
    # Worth a glance: a tree zipped with its top folder (train/...) would show a single label.
    print(f"{args.source}: {len(items)} images, {len({label for _, label in items})} distinct labels")
    to_zip = args.dest.endswith(".zip")
    out_dir = args.dest + ".partial" if to_zip else args.dest
    images = ConvertImages(source, [path for path, _ in items], out_dir, TRANSFORMS[args.transform], args.resolution)
    loader = DataLoader(images, batch_size=None, num_workers=args.workers)
    labels, reused, skipped = [], 0, []
    for index, (was_done, error) in enumerate(tqdm(loader, total=len(images), desc="convert", unit="img")):
        if error:
            tqdm.write(f"warning: skipping unreadable {items[index][0]} ({error})", file=sys.stderr)
            skipped.append(items[index][0])
            continue
        labels.append([image_name(index), items[index][1]])
        reused += was_done
    write_json(os.path.join(out_dir, "dataset.json"), labels)
    if to_zip:
        pack_zip(out_dir, [name for name, _ in labels] + ["dataset.json"], args.dest)
        shutil.rmtree(out_dir)
    print(summary("converted", len(labels), reused, skipped))


def summary(verb, done, reused, skipped):
    """The closing line, e.g. 'converted 123 images (20 already done), skipped 2 unreadable: a.jpg, b.jpg'."""
    line = f"{verb} {done} images" + (f" ({reused} already done)" if reused else "")
    return line + (f", skipped {len(skipped)} unreadable: {', '.join(skipped)}" if skipped else "")


# ----------------------------------------------------------------------------------------------
# encode: VAE posterior mean and std of each image


def load_vae(name, device):
    """A diffusers AutoencoderKL in eval mode: `ema`/`mse` shorthands, a hub name or a local folder."""
    from diffusers import AutoencoderKL  # imported here: it takes seconds and `convert` does not need it

    try:
        vae = AutoencoderKL.from_pretrained(VAE_SHORTHANDS.get(name, name))
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model-url {name}: cannot load an AutoencoderKL ({reason})") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode_batch(vae, images):
    """uint8 images (N, 3, H, W) -> float32 CPU tensor (N, 8, H/8, W/8): posterior mean then std.

    Pixels are mapped to [-1, 1] by x / 127.5 - 1, as the released tool does.
    """
    x = images.to(vae.device, torch.float32, non_blocking=True) / 127.5 - 1
    posterior = vae.encode(x).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float().cpu()


def latent_name(image_relpath):
    """'00000/img00000123.png' -> '00000/img-mean-std-00000123.npy' (same folder and number)."""
    folder, name = os.path.split(image_relpath)
    match = re.fullmatch(r"img(\d+)\.\w+", name)
    if match is None:
        raise UserError(f"{image_relpath}: encode expects images named like convert's (img00000123.png)")
    return f"{folder}/img-mean-std-{match.group(1)}.npy" if folder else f"img-mean-std-{match.group(1)}.npy"


def npy_is_valid(path, shape):
    """True if `path` is a complete float32 .npy of `shape`: a finished output of encode."""
    if not os.path.exists(path):
        return False
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == shape and array.dtype == np.float32


def save_npy(path, array):
    """Writes `array` as .npy atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    with atomic_open(path) as f:
        f.write(buffer.getvalue())


class EncodeImages(Dataset):
    """Item i: (uint8 tensor (3, H, W), i, error).

    An unreadable image, or one of another size, gives a black stand-in and a non-empty error,
    so one bad file neither stops the run nor changes the shape of its batch.
    """

    def __init__(self, source, relpaths, size):
        self.source, self.relpaths, self.size = source, relpaths, size

    def __len__(self):
        return len(self.relpaths)

    def __getitem__(self, index):
        width, height = self.size
        try:
            img = decode_rgb(self.source.read(self.relpaths[index]))
            error = "" if img.size == self.size else f"size {img.width}x{img.height}, expected {width}x{height}"
        except (FileNotFoundError, KeyError, *DECODE_ERRORS) as e:
            img, error = None, describe(e)
        if error:
            return torch.zeros(3, height, width, dtype=torch.uint8), index, error
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), index, ""


def first_image_size(source, relpaths):
    """(width, height) of the first readable image: every image of an encode source has this size."""
    for relpath in relpaths:
        try:
            with PIL.Image.open(io.BytesIO(source.read(relpath))) as img:
                size = img.size
            break
        except (FileNotFoundError, KeyError, *DECODE_ERRORS):
            continue
    else:
        raise UserError(f"--source {source.path}: no readable image")
    if size[0] % VAE_DOWNSAMPLING or size[1] % VAE_DOWNSAMPLING:
        raise UserError(f"--source {source.path}: image size {size[0]}x{size[1]} is not a multiple of 8")
    return size


def plan_batches(indices, batch_size, done):
    """Splits this process's indices into fixed batches and keeps those with an output missing.

    Batches are fixed by position, not formed from what is left, so a resumed run encodes each
    image in the same batch as an uninterrupted run: convolution results can depend on the
    batch size by rounding, and resumed outputs must be byte-identical.
    """
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return [batch for batch in batches if not all(i in done for i in batch)]


def encode_dataset(source, items, dest, vae, batch_size, workers, rank=0, world_size=1):
    """Encodes the images `items` [(relpath, label)] of `source` into `dest`; this process takes
    every world_size-th item from `rank`. Outputs that already verify are kept.

    Returns {"encoded": n newly written, "reused": n already done, "skipped": [unreadable relpaths]}.
    """
    relpaths = [path for path, _ in items]
    width, height = first_image_size(source, relpaths)
    shape = (LATENT_CHANNELS, height // VAE_DOWNSAMPLING, width // VAE_DOWNSAMPLING)
    outputs = [os.path.join(dest, latent_name(path)) for path in relpaths]
    mine = list(range(rank, len(items), world_size))
    done = {i for i in tqdm(mine, desc="check existing", unit="file", disable=rank != 0, leave=False)
            if npy_is_valid(outputs[i], shape)}
    batches = plan_batches(mine, batch_size, done)
    loader = DataLoader(EncodeImages(source, relpaths, (width, height)), batch_sampler=batches,
                        num_workers=workers, pin_memory=vae.device.type == "cuda")
    encoded, skipped = 0, []
    bar = tqdm(total=len(mine), initial=len(mine) - sum(map(len, batches)), desc="encode", unit="img",
               disable=rank != 0)
    for images, indices, errors in loader:
        moments = encode_batch(vae, images).numpy()
        for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
            if error:
                tqdm.write(f"warning: skipping unreadable {relpaths[index]} ({error})", file=sys.stderr)
                skipped.append(relpaths[index])
            elif index not in done:
                save_npy(outputs[index], moments[row])
                encoded += 1
        bar.update(len(indices))
    bar.close()
    return {"encoded": encoded, "reused": len(done), "skipped": skipped}


def distributed_setup():
    """(rank, world_size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        # gloo only carries the final exchange of counts; the generous timeout covers shards
        # that finish far apart.
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world_size, device


def encode(args):
    """The `encode` command: every process encodes its shard, then rank 0 writes dataset.json
    (after all processes have reported) listing every image that has its latent file."""
    if args.dest.endswith(".zip"):
        raise UserError(f"--dest {args.dest}: encode writes a folder (train.py reads vae-sd/ as files)")
    source = Source(args.source)
    items = list_labelled_images(source, class_folders=False)[: args.max_images]
    rank, world_size, device = distributed_setup()
    vae = load_vae(args.model_url, device)
    stats = encode_dataset(source, items, args.dest, vae, args.batch_size, args.workers, rank, world_size)
    everyone = [stats]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, stats)
        # Without this barrier a process could tear gloo down while its peer still sends, which
        # aborts the peer ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return
    skipped = sorted(path for s in everyone for path in s["skipped"])
    unreadable = set(skipped)
    labels = sorted([latent_name(path), label] for path, label in items if path not in unreadable)
    write_json(os.path.join(args.dest, "dataset.json"), labels)
    print(summary("encoded", sum(s["encoded"] + s["reused"] for s in everyone),
                  sum(s["reused"] for s in everyone), skipped))


# ----------------------------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line (exit 2), not a usage dump."""

    def error(self, message):
        raise UserError(message)


def resolution(text):
    """'256x256' -> (256, 256), as (width, height)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or 0 in (int(match.group(1)), int(match.group(2))):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 256x256, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def positive_int(text):
    """An integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative_int(text):
    """An integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="crop and resize images into a folder or .zip of PNGs")
    p.add_argument("--source", required=True, help="class-folder tree, folder with dataset.json, or a .zip of either")
    p.add_argument("--dest", required=True, help="output folder, or a path ending in .zip")
    p.add_argument("--resolution", type=resolution, default=(256, 256), help="WIDTHxHEIGHT (default 256x256)")
    p.add_argument("--transform", choices=sorted(TRANSFORMS), default="center-crop-dhariwal",
                   help="default center-crop-dhariwal (ADM's, used by SRA)")
    p.add_argument("--max-images", type=positive_int, help="convert only the first N source images")
    p.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, help="decoding processes")
    p.set_defaults(func=convert)

    p = commands.add_parser("encode", help="store the VAE posterior mean and std of every image")
    p.add_argument("--source", required=True, help="convert's output: a folder or .zip with dataset.json")
    p.add_argument("--dest", required=True, help="output folder, e.g. OUT/vae-sd")
    p.add_argument("--model-url", default="stabilityai/sd-vae-ft-mse",
                   help="ema | mse | a hub name | a local diffusers AutoencoderKL folder")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per VAE call, per process (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-images", type=positive_int, help="encode only the first N images")
    p.add_argument("--workers", type=non_negative_int, default=DEFAULT_WORKERS, help="decoding processes")
    p.set_defaults(func=encode)
    return parser


def main(argv=None):
    """Runs one command; returns the exit code (2 with a one-line message for a user error)."""
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
