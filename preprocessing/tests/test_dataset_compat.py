"""encode's output loads in the training trees' LatentDataset (SiT-SRA/dataset.py, DiT-SRA/dataset.py).

Each dataset.py is imported by file path under its own module name, with its tree on sys.path only
while it loads (it may import its tree's utils), so the two trees never share a module.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def import_tree_module(path, name):
    """Imports the file `path` as module `name`; the modules it imports from its own folder are
    dropped from sys.modules afterwards, so another tree's same-named files load fresh."""
    folder = str(path.parent)
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
        for key in set(sys.modules) - before:
            if (getattr(sys.modules[key], "__file__", None) or "").startswith(folder):
                del sys.modules[key]
    return module


@pytest.mark.parametrize("tree", ["SiT-SRA", "DiT-SRA"])
def test_latent_dataset_reads_encode_output(tree, encoded):
    path = REPO / tree / "dataset.py"
    module = import_tree_module(path, f"{tree.replace('-', '_').lower()}_dataset")
    vae_sd, _ = encoded
    dataset = module.LatentDataset(str(vae_sd.parent))
    labels = sorted(json.loads((vae_sd / "dataset.json").read_text())["labels"])
    assert len(dataset) == len(labels)
    for index, (name, label) in enumerate(labels):
        moments, item_label = dataset[index]
        assert moments.dtype == torch.float32 and moments.shape == (8, 5, 5)
        assert torch.equal(moments, torch.from_numpy(np.load(vae_sd / name)))
        assert int(item_label) == label
