"""The Inception features on a random-weights network saved as torch-fidelity's file: loading, layout, errors."""
import argparse
import shutil

import numpy as np
import pytest
import torch
from conftest import random_images

from errors import UserError
from inception import SPATIAL_DIM, WEIGHTS_URL, InceptionFeatures, default_weights_path


@pytest.fixture(scope="module")
def features(inception_weights):
    return InceptionFeatures(inception_weights, "cpu")


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


def test_any_image_size_is_resized_to_the_same_features(features):
    pool, spatial = features(random_images(1, size=48))
    assert pool.shape == (1, 2048) and spatial.shape == (1, 2023)


def test_default_weights_are_torch_fidelitys_cached_file(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]
    default_weights_path().parent.mkdir(parents=True)
    shutil.copy(inception_weights, default_weights_path())
    InceptionFeatures(None, "cpu")  # loads the cached file; no download is tried (none is possible here)


def test_missing_or_foreign_weights_are_one_line_errors_saying_where_to_get_them(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")  # weights_only refuses to unpickle it
    (tmp_path / "text.pth").write_text("not weights")
    cases = {"none.pth": "no such file", "linear.pth": "is not the Inception weights",
             "pickled.pth": "is not a weights file that torch.load", "text.pth": "is not a weights file that torch.load"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as error:
            InceptionFeatures(tmp_path / name, "cpu")
        text = str(error.value)
        assert name in text and WEIGHTS_URL in text and "\n" not in text


def test_features_do_not_depend_on_the_batch(features):
    images = random_images(3, size=32, seed=5)
    pool, spatial = features(images)
    pool_one, spatial_one = features(np.ascontiguousarray(images[1:2]))
    assert torch.allclose(pool[1:2], pool_one, rtol=1e-5, atol=1e-6)
    assert torch.allclose(spatial[1:2], spatial_one, rtol=1e-5, atol=1e-6)
