"""The demo's quality number: a small CNN digit classifier, trained on real digits, scores generated ones.

- conditional accuracy: the share of samples generated for class k that the classifier calls k;
- Frechet distance between the classifier's penultimate features of real held-out digits and of
  generated digits (FID's formula, with this classifier in place of Inception).
"""
import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FEATURES = 128


class DigitNet(nn.Module):
    """Three conv-pool stages (32 -> 4 px), a FEATURES-wide hidden layer, 10 logits. The Frechet features are
    the hidden layer before its ReLU: after it, units that never fire would make the covariances singular."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x):
        return self.hidden(self.convs(x).flatten(1))

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def to_input(images):
    """uint8 (N, 32, 32, 3) -> float (N, 1, 32, 32) in [0, 1]: the digits are gray, so the channels are averaged."""
    return torch.from_numpy(images).float().mean(dim=3, keepdim=True).permute(0, 3, 1, 2) / 255


def shift(x, generator, max_shift=2):
    """Each image moved by up to max_shift pixels (rolled: the borders are black), so that the classifier
    does not depend on MNIST's exact centring, which generated digits need not follow."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(images, labels, epochs=6, batch_size=64, lr=2e-3, seed=0):
    """A DigitNet trained with Adam on uint8 images (N, 32, 32, 3) and labels (N,)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = DigitNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    x, y = to_input(images), torch.from_numpy(labels)
    steps = epochs * (len(x) // batch_size)
    progress = tqdm(total=steps, desc="classifier", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(net(shift(x[batch], generator)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net, images, batch_size=500):
    """(predicted labels (N,), penultimate features (N, FEATURES)) of uint8 images (N, 32, 32, 3)."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        h = net.features(to_input(images[start:start + batch_size]))
        features.append(h)
        predictions.append(net.head(F.relu(h)).argmax(dim=1))
    return torch.cat(predictions).numpy(), torch.cat(features).double().numpy()


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D)."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    # sqrtm of a product of covariances can carry tiny imaginary parts from rounding
    covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean))


def score(net, images, labels, reference_features):
    """{conditional_accuracy, per_class_accuracy, frechet_distance} of images (N, 32, 32, 3) meant to show
    `labels`, against the features of real digits."""
    predicted, features = predict(net, images)
    per_class = [float(np.mean(predicted[labels == k] == k)) if np.any(labels == k) else None for k in range(10)]
    return {"conditional_accuracy": float(np.mean(predicted == labels)), "per_class_accuracy": per_class,
            "frechet_distance": frechet_distance(reference_features, features)}
