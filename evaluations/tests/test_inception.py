"""The Inception features on a random-weights network saved as torch-fidelity's file: loading, layout, errors."""
import argparse
import hashlib
import shutil

import numpy as np
import pytest
import torch
from conftest import random_images

from errors import UserError
import metrics
from inception import SPATIAL_DIM, WEIGHTS_SHA256_PREFIX, WEIGHTS_URL, InceptionFeatures, default_weights_path


@pytest.fixture(scope="module")
def features(inception_weights):
    return InceptionFeatures(inception_weights, "cpu", verify=False)  # random weights: not the published checksum


def tf1_bilinear_resize(images, size):
    """TF1's resize_bilinear (align_corners=False, no half-pixel centres) of (B, H, W, C) float64 images to
    (B, size, size, C): output pixel i samples the input at i * H / size, the next row or column clamped to the last."""
    def axis(n):
        src = np.arange(size) * n / size
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n - 1), src - low

    (y0, y1, fy), (x0, x1, fx) = axis(images.shape[1]), axis(images.shape[2])
    top = images[:, y0][:, :, x0] + (images[:, y0][:, :, x1] - images[:, y0][:, :, x0]) * fx[None, None, :, None]
    bottom = images[:, y1][:, :, x0] + (images[:, y1][:, :, x1] - images[:, y1][:, :, x0]) * fx[None, None, :, None]
    return top + (bottom - top) * fy[None, :, None, None]


def test_spatial_features_are_mixed_6_conv_first_7_channels_in_hwc_order(features):
    """Checked against a hook on the network: element (h * 17 + w) * 7 + c of a row is channel c at (h, w)."""
    seen = {}
    handles = [features.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(mixed_6=o.clone())),
               features.net.Mixed_7c.register_forward_hook(lambda m, i, o: seen.update(mixed_10=o.clone()))]
    try:
        pool, spatial = features(random_images(2, size=32))
    finally:
        for handle in handles:
            handle.remove()
    assert seen["mixed_6"].shape == (2, 192, 17, 17) and spatial.shape == (2, SPATIAL_DIM) == (2, 2023)
    expected = torch.empty(2, 17 * 17 * 7)
    for b in range(2):
        for h in range(17):
            for w in range(17):
                for c in range(7):
                    expected[b, (h * 17 + w) * 7 + c] = seen["mixed_6"][b, c, h, w]
    assert torch.equal(spatial, expected)
    assert (spatial >= 0).all() and spatial.std() > 0  # the ReLU output, and not a constant
    assert pool.shape == (2, 2048)
    assert torch.allclose(pool, seen["mixed_10"].mean(dim=(2, 3)), atol=1e-6)  # pool_3: the mean over 8 x 8
    assert not torch.allclose(pool[0], pool[1])
    assert features.logits_weight.shape == (1008, 2048)


def test_images_of_any_size_enter_the_network_resized_to_299_as_tf1_does(features):
    """The first convolution sees TF1's bilinear resize of the image to 299 x 299, scaled to (x - 128) / 128."""
    seen = {}
    handle = features.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, inputs: seen.update(x=inputs[0].clone()))
    images = random_images(2, size=48, seed=7)
    try:
        features(images)
    finally:
        handle.remove()
    expected = (tf1_bilinear_resize(images.astype(np.float64), 299) - 128) / 128
    assert seen["x"].shape == (2, 3, 299, 299)
    assert np.allclose(seen["x"].permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)


def test_a_constant_image_gives_the_same_features_at_every_size(features):
    """Bilinear resizing keeps a constant image constant, so its size cannot change the features."""
    colour = np.array([200, 30, 120], dtype=np.uint8)
    pools = [features(np.ascontiguousarray(np.broadcast_to(colour, (1, size, size, 3))))[0] for size in (8, 299, 517)]
    assert all(torch.allclose(pools[0], pool, rtol=1e-5, atol=1e-6) for pool in pools[1:])
    assert not torch.allclose(pools[0], features(random_images(1, size=8))[0], rtol=1e-3)


def test_class_probabilities_are_the_softmax_of_torch_fidelitys_logits_unbiased(features, inception_weights):
    """torch-fidelity's own `logits_unbiased` feature (pool_3 @ W without the bias) of the same weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("isc", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(
        inception_weights))
    images = random_images(3, size=32, seed=8)
    pool, logits = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    probs = metrics.class_probabilities(features(images)[0].numpy(), features.logits_weight)
    assert probs.shape == (3, 1008)
    assert np.allclose(probs, torch.softmax(logits.double(), dim=1).numpy(), rtol=1e-4, atol=1e-7)
    assert np.allclose(features(images)[0].numpy(), pool.numpy(), rtol=1e-5, atol=1e-6)


def test_default_weights_are_torch_fidelitys_cached_file_checked_against_its_name(features, inception_weights,
                                                                                  tmp_path, monkeypatch):
    """A file in the cache is used, not downloaded again: here the random one, which the SHA-256 check refuses
    unless told otherwise, and then gives the features of the same file passed by path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]
    assert WEIGHTS_URL.endswith(f"-{WEIGHTS_SHA256_PREFIX}.pth")  # torch-fidelity's file is the one checked
    default_weights_path().parent.mkdir(parents=True)
    shutil.copy(inception_weights, default_weights_path())
    with pytest.raises(UserError, match=f"SHA-256 .* is not the published {WEIGHTS_SHA256_PREFIX}") as error:
        InceptionFeatures(None, "cpu")
    assert str(default_weights_path()) in str(error.value) and WEIGHTS_URL in str(error.value)
    cached = InceptionFeatures(None, "cpu", verify=False)
    assert cached.sha256 == features.sha256 and cached.sha256 == hashlib.sha256(inception_weights.read_bytes()).hexdigest()
    images = random_images(2, size=16, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(cached(images), features(images), strict=True))


def test_a_failed_download_is_one_line_saying_where_to_get_the_weights(tmp_path, monkeypatch):
    """Offline: a proxy on a closed local port makes the download fail at once (nothing leaves the machine)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(UserError, match="could not download the Inception weights") as error:
        InceptionFeatures(None, "cpu")
    assert WEIGHTS_URL in str(error.value) and "--inception-weights" in str(error.value)
    assert "\n" not in str(error.value) and not default_weights_path().exists()


def test_missing_or_foreign_weights_are_one_line_errors_saying_where_to_get_them(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")  # weights_only refuses to unpickle it
    (tmp_path / "text.pth").write_text("not weights")
    cases = {"none.pth": "no such file", "linear.pth": "is not the Inception weights",
             "pickled.pth": "is not a weights file that torch.load", "text.pth": "is not a weights file that torch.load"}
    for name, message in cases.items():
        for verify, expected in ((False, message), (True, "no such file" if name == "none.pth" else "SHA-256")):
            with pytest.raises(UserError, match=expected) as error:
                InceptionFeatures(tmp_path / name, "cpu", verify=verify)
            text = str(error.value)
            assert name in text and WEIGHTS_URL in text and "\n" not in text


def test_features_do_not_depend_on_the_batch(features):
    images = random_images(3, size=32, seed=5)
    pool, spatial = features(images)
    pool_one, spatial_one = features(np.ascontiguousarray(images[1:2]))
    assert torch.allclose(pool[1:2], pool_one, rtol=1e-5, atol=1e-6)
    assert torch.allclose(spatial[1:2], spatial_one, rtol=1e-5, atol=1e-6)
