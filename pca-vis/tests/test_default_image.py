"""assets/default.png is small, 256 x 256 RGB, and exactly what make_default_image.py draws."""
import numpy as np
from PIL import Image

from main_pca import DEFAULT_IMAGE
from make_default_image import SIZE, draw


def test_default_image_is_the_drawn_one():
    assert DEFAULT_IMAGE.stat().st_size < 50_000
    with Image.open(DEFAULT_IMAGE) as image:
        assert image.mode == "RGB" and image.size == (256, 256) == (SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(image), draw())
