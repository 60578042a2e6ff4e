"""Draws assets/default.png, main_pca.py's default input: a red parrot on a branch before sky and leaves.

    cd pca-vis && python make_default_image.py

Pure numpy (anti-aliased ellipses), so the pixels are the same on every machine; a test checks that
the committed PNG matches draw().
"""
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256
OUT = Path(__file__).resolve().parent / "assets" / "default.png"


def ellipse(cx, cy, a, b, angle=0.0):
    """Coverage in [0, 1] of an ellipse (center, semi-axes a, b in pixels, rotated by angle degrees),
    with a one-pixel soft edge."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    theta = np.deg2rad(angle)
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    distance = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1) * min(a, b)
    return np.clip(0.5 - distance, 0, 1)


def paint(image, coverage, color):
    image += coverage[..., None] * (np.array(color, dtype=np.float64) - image)


def draw():
    """uint8 (SIZE, SIZE, 3)."""
    rows = np.linspace(0, 1, SIZE)[:, None, None]
    image = np.broadcast_to((1 - rows) * [110, 170, 235] + rows * [200, 225, 240], (SIZE, SIZE, 3)).copy()
    for cx, cy, a, b, shade in [(20, 230, 90, 60, 70), (230, 250, 80, 55, 90), (250, 40, 45, 70, 80),
                                (5, 60, 40, 55, 100)]:
        paint(image, ellipse(cx, cy, a, b), (40, shade + 60, 45))
    paint(image, ellipse(128, 196, 140, 9, -8), (105, 70, 40))  # branch
    paint(image, ellipse(98, 200, 14, 58, 28), (40, 80, 200))  # tail
    paint(image, ellipse(104, 196, 7, 52, 28), (210, 40, 35))
    paint(image, ellipse(130, 128, 38, 58, 18), (215, 35, 30))  # body
    paint(image, ellipse(118, 132, 26, 46, 22), (245, 200, 40))  # wing: yellow band, blue feathers
    paint(image, ellipse(112, 146, 22, 38, 22), (35, 90, 205))
    paint(image, ellipse(150, 72, 28, 26), (220, 40, 32))  # head
    paint(image, ellipse(158, 68, 11, 9), (245, 240, 230))  # eye patch, eye
    paint(image, ellipse(160, 67, 3.5, 3.5), (15, 15, 15))
    paint(image, ellipse(176, 84, 11, 15, -20), (235, 225, 205))  # beak
    paint(image, ellipse(174, 92, 6, 7, -20), (40, 35, 35))
    paint(image, ellipse(132, 188, 9, 5), (90, 90, 95))  # feet
    return np.round(image).astype(np.uint8)


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    Image.fromarray(draw()).save(OUT, optimize=True)
    print(f"saved {OUT} ({OUT.stat().st_size} bytes)")
