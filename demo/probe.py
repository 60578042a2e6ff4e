"""The representation probe: how linearly each block of a trained SiT separates the digits, per noise level.

For held-out digits, x_t = (1 - t) x + t eps (SiT's linear path; t = 1 is pure noise) goes through the
EMA model with the null label, so the class is not handed to it; the tokens after every block, averaged
over tokens, are the features of a logistic regression fitted on one half of the digits and scored on
the other. This is the linear probe REPA and SRA use to show "better representations".
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SiT-SRA"))  # the model is SiT-SRA's, not a copy

from models import SiT_models  # noqa: E402
from utils import load_checkpoint, load_weights, model_state_dict  # noqa: E402

def load_ema(checkpoint, model, resolution, num_classes):
    """The EMA SiT of a train.py checkpoint, in eval mode; the architecture is given, not read from it."""
    ckpt = load_checkpoint(checkpoint)
    net = SiT_models[model](input_size=resolution // 8, num_classes=num_classes,
                            class_dropout_prob=ckpt["args"].cfg_prob)
    load_weights(net, model_state_dict(ckpt), f"--ckpt {checkpoint}", f"--model {model} --resolution {resolution}")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def block_features(model, x_t, t, batch_size=250):
    """Token-averaged features after every block (depth, N, D) of x_t (N, C, h, w) at time t, null label.

    One `model.features(..., depth=model.depth)` pass per batch; hooks keep each block's output."""
    null = torch.full((x_t.shape[0],), model.num_classes, dtype=torch.long)
    times = torch.full((x_t.shape[0],), float(t))
    per_block = [[] for _ in model.blocks]
    hooks = [block.register_forward_hook(lambda _module, _inputs, h, k=k: per_block[k].append(h.mean(dim=1)))
             for k, block in enumerate(model.blocks)]
    try:
        for start in range(0, len(x_t), batch_size):
            end = start + batch_size
            model.features(x_t[start:end], times[start:end], null[start:end], depth=model.depth)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([torch.cat(chunks) for chunks in per_block])


def linear_probe(features, labels, seed=0):
    """Test accuracy of a logistic regression on standardised features (N, D) with labels (N,): fitted on
    the even positions, scored on the odd ones (a fixed split; with digits sorted by class both halves
    hold every class)."""
    train, test = slice(0, None, 2), slice(1, None, 2)
    scaler = StandardScaler().fit(features[train])
    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    classifier.fit(scaler.transform(features[train]), labels[train])
    return float(classifier.score(scaler.transform(features[test]), labels[test]))


def model_depth(name):
    """The number of blocks of the SiT config `name` (e.g. "SiT-T/1" -> 6)."""
    return SiT_models[name].keywords["depth"]


def probe(model, latents, labels, times, seed=0):
    """{"times": [...], "accuracy": [[block 1, ..., block depth] per time]} for scaled latents (N, C, h, w)
    (what the SiT sees) and their labels (N,). The noise is drawn from `seed`, the same for every model."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    accuracy = []
    for t in tqdm(times, desc="probe", unit="t"):
        features = block_features(model, (1 - t) * latents + t * noise, t).double().numpy()
        accuracy.append([linear_probe(block, labels, seed) for block in features])
    return {"times": list(times), "accuracy": accuracy}


def summary(result, block):
    """Two numbers of a probe result: the accuracy at `block` (1-based) and at the best block, each averaged
    over the times."""
    accuracy = np.array(result["accuracy"])
    return {f"block_{block}": float(accuracy[:, block - 1].mean()), "best_block": float(accuracy.max(axis=1).mean())}
