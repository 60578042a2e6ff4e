"""The crops of `convert` against slow reference versions written here from their definitions."""
import io

import numpy as np
import PIL.Image
import pytest

import dataset_tools as dt


def random_rgb(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def adm_reference(img, size):
    """ADM's crop restated: count the halvings first, then apply them, BICUBIC to the size, crop."""
    short = min(img.size)
    halvings = 0
    while short >= size << (halvings + 1):  # floor-halving k times keeps short >= 2*size iff short >= size * 2**(k+1)
        halvings += 1
    for _ in range(halvings):
        img = img.resize((img.width // 2, img.height // 2), PIL.Image.BOX)
    scale = size / min(img.size)  # ADM's float expression, so rounding ties go the same way
    pixels = np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), PIL.Image.BICUBIC))
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


@pytest.mark.parametrize("size, width, height", [
    (15, 37, 53),     # odd sizes, one halving
    (15, 10, 11),     # upscaling, 11 * 1.5 = 16.5 rounds to even
    (16, 5, 9),       # tiny: much smaller than the output
    (16, 16, 16),     # already the size
    (16, 64, 33),     # short side just above 2x: one halving
    (15, 251, 1003),  # huge: four halvings
    (32, 1000, 700),  # huge: four halvings, landscape
])
def test_dhariwal_matches_reference(size, width, height):
    img = random_rgb(width, height)
    ours = np.asarray(dt.center_crop_dhariwal(img, size, size))
    assert ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, adm_reference(img, size))


@pytest.mark.parametrize("width, height", [(37, 53), (64, 20), (7, 9), (300, 301)])
def test_center_crop_matches_reference(width, height):
    img = random_rgb(width, height, seed=1)
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    square = PIL.Image.fromarray(np.asarray(img)[top:top + side, left:left + side])
    expected = np.asarray(square.resize((24, 16), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(np.asarray(dt.center_crop(img, 24, 16)), expected)


@pytest.mark.parametrize("width, height, crop_w, crop_h", [
    (100, 30, 60, 30),   # wider than 2:1: crop the width
    (40, 40, 40, 20),    # square: crop the height
    (61, 31, 61, 30),    # narrower than 2:1: keep the width, 61 / 2 = 30.5 rows round to 30
])
def test_center_crop_wide_crops_to_target_aspect(width, height, crop_w, crop_h):
    """Target 40x20 (2:1): the expected crop sizes are worked out by hand in the parameters."""
    img = random_rgb(width, height, seed=2)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    region = PIL.Image.fromarray(np.asarray(img)[top:top + crop_h, left:left + crop_w])
    expected = np.asarray(region.resize((40, 20), PIL.Image.LANCZOS))
    np.testing.assert_array_equal(np.asarray(dt.center_crop_wide(img, 40, 20)), expected)


def test_image_names_group_a_thousand_per_folder():
    assert dt.image_name(0) == "00000/img00000000.png"
    assert dt.image_name(999) == "00000/img00000999.png"
    assert dt.image_name(1234) == "00001/img00001234.png"
    assert dt.latent_name("00001/img00001234.png") == "00001/img-mean-std-00001234.npy"


def test_decode_rgb_converts_every_mode():
    """Grayscale keeps equal channels, alpha is dropped (not composited), palette maps to its colours."""
    gray = PIL.Image.new("L", (2, 2), 77)
    rgba = PIL.Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    palette = PIL.Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    cmyk = PIL.Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    for img, pixel in [(gray, (77, 77, 77)), (rgba, (10, 20, 30)), (palette, (200, 100, 50)), (cmyk, (255, 255, 255))]:
        buffer = io.BytesIO()
        img.save(buffer, format="tiff" if img.mode == "CMYK" else "png")
        out = dt.decode_rgb(buffer.getvalue())
        assert out.mode == "RGB" and out.getpixel((1, 1)) == pixel, img.mode
