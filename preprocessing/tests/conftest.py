"""Puts this tree on sys.path (tests `import dataset_tools`) and builds the data the tests share:
a small ImageNet-style tree, a folder of convert-style PNGs, a tiny random VAE, and one
reference run of each command."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
# The test machine is small and shared: OpenMP threads spinning against other processes make
# these tiny convolutions ~100x slower. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The tests compare against CPU float32 encodes bit for bit or to 1e-5; a GPU's TF32 convolutions
# would not match. They run on the CPU even where a GPU is present.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def cli():
    """run(*args) runs `python dataset_tools.py ARGS` in a subprocess and returns it completed."""
    def run(*args, command=None):
        command = command or [sys.executable, str(TREE / "dataset_tools.py")]
        return subprocess.run([*command, *map(str, args)], cwd=TREE, capture_output=True, text=True, timeout=300)
    return run


@pytest.fixture(scope="session")
def read_tree():
    """read(folder) -> {relative path: bytes} of every file below it, hidden ones included."""
    def read(folder):
        folder = Path(folder)
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return read


def random_image(seed, width, height, mode="RGB"):
    """A noisy RGB image converted to `mode`; smooth gradients plus noise so JPEG keeps detail."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(height), np.arange(width))[..., None] * np.array([3, 5, 7])
    pixels = (ramp + rng.integers(0, 60, (height, width, 3))) % 256
    return PIL.Image.fromarray(pixels.astype(np.uint8)).convert(mode)


@pytest.fixture(scope="session")
def class_tree(tmp_path_factory):
    """An ImageNet-style tree; class folders created out of order, one file of each awkward kind.

    Sorted relative paths, i.e. image indices: 0 n01/broken.JPEG (not an image), 1 n01/gray.png (L,
    smaller than the output), 2 n01/rgb.JPEG, 3 n02/cmyk.jpg, 4 n02/rgba.png, 5 n03/palette.gif,
    6 n03/truncated.jpg (second half cut off). n03/notes.txt and the hidden n01/._rgb.JPEG are ignored.
    """
    root = tmp_path_factory.mktemp("tree")
    for name in ("n03", "n01", "n02"):
        (root / name).mkdir()
    (root / "n01/broken.JPEG").write_bytes(b"this is not a JPEG file")
    random_image(1, 29, 23, "L").save(root / "n01/gray.png")
    random_image(2, 61, 45).save(root / "n01/rgb.JPEG", quality=95)
    random_image(3, 50, 40, "CMYK").save(root / "n02/cmyk.jpg")
    random_image(4, 33, 70, "RGBA").save(root / "n02/rgba.png")
    random_image(5, 64, 48).convert("P", palette=PIL.Image.Palette.ADAPTIVE).save(root / "n03/palette.gif")
    random_image(6, 80, 64).save(root / "n03/full.jpg")
    data = (root / "n03/full.jpg").read_bytes()
    (root / "n03/full.jpg").unlink()
    (root / "n03/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "n03/notes.txt").write_text("not an image")
    (root / "n01/._rgb.JPEG").write_bytes(b"macOS metadata")  # hidden: must not count as an image
    return root


@pytest.fixture(scope="session")
def converted(class_tree, cli, tmp_path_factory):
    """(folder, process) of one uninterrupted `convert` of class_tree at 32x32 with 2 workers."""
    dest = tmp_path_factory.mktemp("converted") / "images"
    process = cli("convert", f"--source={class_tree}", f"--dest={dest}", "--resolution=32x32", "--workers=2")
    assert process.returncode == 0, process.stderr
    return dest, process


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory):
    """A folder as convert writes it: 11 PNGs of 40x40 (latents 5x5) and dataset.json, label of
    index i is i % 5; index 4 is missing (as if skipped) and index 1000 opens a second folder."""
    root = tmp_path_factory.mktemp("images")
    labels = []
    for index in [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 1000]:
        name = f"{index // 1000:05d}/img{index:08d}.png"
        (root / name).parent.mkdir(exist_ok=True)
        random_image(100 + index, 40, 40).save(root / name)
        labels.append([name, index % 5])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A saved, randomly initialised AutoencoderKL with the SD-VAE layout (downsampling 8), tiny."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("tiny-vae")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 16),
                  latent_channels=4, layers_per_block=1, norm_num_groups=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def encoded(images_dir, tiny_vae_dir, cli, tmp_path_factory):
    """(vae-sd folder, process) of one uninterrupted `encode`: batch 7, 2 decoding workers."""
    dest = tmp_path_factory.mktemp("data") / "vae-sd"
    process = cli("encode", f"--source={images_dir}", f"--dest={dest}", f"--model-url={tiny_vae_dir}",
                  "--batch-size=7", "--workers=2")
    assert process.returncode == 0, process.stderr
    return dest, process
