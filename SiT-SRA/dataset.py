"""VAE latents of ImageNet as written by preprocessing/dataset_tools.py encode.

    DATA_DIR/vae-sd/dataset.json                      {"labels": [["00000/img-mean-std-00000000.npy", 207], ...]}
    DATA_DIR/vae-sd/00000/img-mean-std-00000000.npy   float32 (8, H/8, W/8): posterior mean (4) and std (4)

Items are (moments (8, h, w) float32, label) in the order of the sorted relative paths.
This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it).
"""
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import LATENT_SCALE, UserError


class LatentDataset(Dataset):
    def __init__(self, data_dir, resolution=None, num_classes=None):
        """data_dir: the folder holding vae-sd/. With resolution and num_classes given, the latent
        shape (8, resolution/8, resolution/8) and every label are checked (one-line UserError)."""
        self.root = Path(data_dir) / "vae-sd"
        index_path = self.root / "dataset.json"
        if not Path(data_dir).is_dir():
            raise UserError(f"--data-dir {data_dir}: no such folder")
        if not index_path.is_file():
            raise UserError(f"--data-dir {data_dir}: missing {index_path} (run preprocessing/dataset_tools.py encode)")
        try:
            labels = json.loads(index_path.read_text())["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index_path}: not a dataset.json with a 'labels' list ({e})") from None
        if not labels:
            raise UserError(f"{index_path}: the dataset is empty")
        self.items = sorted((str(name).replace("\\", "/"), int(label)) for name, label in labels)
        if num_classes is not None:
            bad = [(name, label) for name, label in self.items if not 0 <= label < num_classes]
            if bad:
                raise UserError(f"{index_path}: label {bad[0][1]} of {bad[0][0]} is outside 0..{num_classes - 1} "
                                f"(--num-classes {num_classes}); {len(bad)} such labels")
        self.shape = None if resolution is None else (8, resolution // 8, resolution // 8)
        if self.shape is not None:  # a wrong --resolution fails here, not in a DataLoader worker
            self.check_shape(*self.read(0))

    def __len__(self):
        return len(self.items)

    def read(self, index):
        """(path, moments as stored) of item `index`; an unreadable file is a UserError."""
        path = self.root / self.items[index][0]
        try:
            return path, np.load(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read latent file ({e})") from None

    def check_shape(self, path, moments):
        """A latent of another shape than --resolution's is a UserError."""
        if self.shape is not None and moments.shape != self.shape:
            raise UserError(f"{path}: latent shape {moments.shape}, expected {self.shape} for "
                            f"--resolution {self.shape[1] * 8}")

    def __getitem__(self, index):
        path, moments = self.read(index)
        self.check_shape(path, moments)
        return torch.from_numpy(moments.astype(np.float32, copy=False)), self.items[index][1]


def sample_posterior(moments):
    """moments (N, 8, h, w) -> scaled latents (N, 4, h, w): (mean + std * randn) * 0.18215."""
    mean, std = moments.chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * LATENT_SCALE
