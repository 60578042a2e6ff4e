"""main_pca.py draws the released pca-vis recipe (the paper's figure): its PNG tiles are compared with a
plain re-derivation of the released steps written here (torchvision's Resize((r, r)), a posterior sample
x 0.18215, x_t = (1 - t) x + t noise, the released model's forward and its LayerNorm or per-channel min-max
written out in conftest, sklearn's PCA, min-max per component) on the weights of the tiny SiT and the tiny random
VAE of conftest. Nothing of main_pca.py or of SiT-SRA's model code computes the reference."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from conftest import LATENT, RESOLUTION, TINY, released_normalised, released_tokens, tiny_sit
from diffusers import AutoencoderKL
from PIL import Image
from sklearn.decomposition import PCA

from main_pca import DEFAULT_IMAGE, GAP, LABEL_H, LABEL_W, TILE, main

TIMES, LAYERS, LABEL, SEED = [0.7, 0.2], [2, 12], 3, 5
SIDE = LATENT // 2  # tokens per side of SiT-S/2
HEADS, PATCH = 6, 2  # SiT-S/2


def token_pixels(png, row, col):
    """(SIDE, SIDE, 3) int: one pixel per token of the map of time row, layer col (column 0 is the input)."""
    y, x = LABEL_H + row * (TILE + GAP), LABEL_W + (col + 1) * (TILE + GAP)
    return png[y:y + TILE:TILE // SIDE, x:x + TILE:TILE // SIDE].astype(int)


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    """A 256 x 160 crop of the default image: not square, so resizing and center-cropping differ."""
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    with Image.open(DEFAULT_IMAGE) as image:
        image.crop((0, 48, 256, 208)).save(path)
    return path


@torch.no_grad()
def released_maps(image_path, vae_dir, state, baseline, feed_one_minus_t, center_crop):
    """[time][layer] -> (side, side, 3) in [0, 1], step by step as the released get_f, sito/sit and pca_v.

    The released script draws from the global RNG without a seed; here the same draws, in the same order
    (per time: the posterior sample, then the noise), come from a generator seeded with SEED.
    """
    image = Image.open(image_path).convert("RGB")
    crop = [T.CenterCrop(min(image.size))] if center_crop else []
    transform = T.Compose(crop + [T.Resize((RESOLUTION, RESOLUTION)), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    dist = vae.encode(transform(image)[None]).latent_dist
    generator = torch.Generator().manual_seed(SEED)
    maps = []
    for t in TIMES:
        x = dist.sample(generator=generator) * 0.18215
        noise = torch.randn(x.shape, generator=generator)
        x_t = (1 - t) * x + t * noise
        t_model = torch.tensor([1 - t if feed_one_minus_t else t])
        tokens = released_tokens(state, x_t, t_model, torch.tensor([LABEL]), LAYERS, HEADS, PATCH)
        row = []
        for k in LAYERS:
            h = released_normalised(tokens[k], baseline)[0].double()  # (T, D)
            scores = PCA(n_components=3, svd_solver="full").fit_transform(h.numpy())
            scores = (scores - scores.min(0)) / (scores.max(0) - scores.min(0))
            row.append(scores.reshape(SIDE, SIDE, 3))
        maps.append(row)
    return maps


@pytest.mark.parametrize("baseline, flags, feed_one_minus_t, center_crop", [
    (False, [], False, False),
    (False, ["--center-crop"], False, True),
    (True, [], False, False),  # legacy: the original SiT is fed t, as for the paper's figures
    (True, ["--no-legacy"], True, False),
])
def test_png_tiles_are_the_released_recipe(baseline, flags, feed_one_minus_t, center_crop, sra_ckpt, sit_ckpt,
                                           tiny_vae_dir, wide_image, tmp_path):
    out = tmp_path / "pca.png"
    ckpt = sit_ckpt if baseline else sra_ckpt
    main(["--ckpt", str(ckpt), *(["--baseline"] if baseline else []), *flags, "--img_path", str(wide_image),
          "--vae", str(tiny_vae_dir), "--times", *map(str, TIMES), "--layers", *map(str, LAYERS),
          "--seed", str(SEED), "--save_path", str(out), *TINY])
    png = np.asarray(Image.open(out))
    expected = released_maps(wide_image, tiny_vae_dir, tiny_sit(learn_sigma=baseline).state_dict(), baseline,
                             feed_one_minus_t, center_crop)
    for row in range(len(TIMES)):
        for col in range(len(LAYERS)):
            np.testing.assert_allclose(token_pixels(png, row, col), np.round(expected[row][col] * 255), atol=1,
                                       err_msg=f"t={TIMES[row]} layer {LAYERS[col]}")
