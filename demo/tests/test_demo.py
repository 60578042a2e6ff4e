"""The demo end to end with a tiny budget (a subprocess, as `bash demo.sh` runs it), and its own pieces:
the exact latent rescaling of the VAE and the Frechet distance."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import run_demo
import scoring
import vae as vae_lib
from conftest import TREE

SAMPLES = 20
TINY_BUDGET = ["--vae-steps", "20", "--train-steps", "10", "--batch-size", "16", "--num-samples", str(SAMPLES),
               "--sampling-steps", "3", "--classifier-epochs", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`run_demo.py --compare` with a tiny budget: (output folder, stdout)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run([sys.executable, str(TREE / "run_demo.py"), "--out", str(out), "--compare", *TINY_BUDGET],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return out, result.stdout


def test_data_vae_and_latents_have_the_real_formats(demo_run):
    out, _ = demo_run
    images = json.loads((out / "data/images/dataset.json").read_text())["labels"]
    assert len(images) == 5000 and sorted({label for _, label in images}) == list(range(10))
    with Image.open(out / "data/images" / images[0][0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    latents = json.loads((out / "data/vae-sd/dataset.json").read_text())["labels"]
    assert len(latents) == 5000
    moments = np.load(out / "data/vae-sd" / latents[0][0])
    assert moments.shape == (8, 4, 4) and moments.dtype == np.float32
    assert (out / "vae/config.json").is_file()


@pytest.mark.parametrize("run", ["sra", "baseline"])
def test_each_run_writes_checkpoint_grids_npz_and_pca(demo_run, run):
    out, _ = demo_run
    assert (out / f"exps/{run}/checkpoints/step-10.pt").is_file()
    with Image.open(out / f"exps/{run}/samples/step-10.png") as grid:
        assert grid.size == (8 * 32, 8 * 32)  # the 64-image grid of train.py
    with Image.open(out / f"samples-{run}.png") as by_digit:
        assert by_digit.size == (SAMPLES // 10 * 32, 10 * 32)  # one row per digit
    (npz,) = (out / "samples" / run).glob("*.npz")
    samples = np.load(npz)["arr_0"]
    assert samples.shape == (SAMPLES, 32, 32, 3) and samples.dtype == np.uint8
    assert len(list(npz.with_suffix("").glob("*.png"))) == SAMPLES
    with Image.open(out / f"pca-{run}.png") as pca:
        assert pca.mode == "RGB" and pca.width > pca.height  # 4 noise levels x (input + 6 blocks)


def test_metrics_json_and_the_printed_report(demo_run):
    out, stdout = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["classifier"]["held_out_accuracy"] <= 1
    assert metrics["classifier"]["held_out_digits"] == 1000
    assert set(metrics["references"]) == {"real_digits", "vae_reconstructions"}
    assert set(metrics["runs"]) == {"sra", "baseline"}
    for result in [*metrics["references"].values(), *metrics["runs"].values()]:
        assert 0 <= result["conditional_accuracy"] <= 1
        assert len(result["per_class_accuracy"]) == 10
        assert math.isfinite(result["frechet_distance"]) and result["frechet_distance"] >= 0
    assert metrics["timings_s"]["total"] > 0
    report = stdout[stdout.index("=== artifacts"):]
    for path in [str(out / "metrics.json"), str(out / "pca-sra.png"), str(out / "exps/baseline/samples/step-10.png")]:
        assert path in report
    assert "conditional accuracy" in report and "Frechet distance" in report


def test_latent_rescaling_is_exact_and_gives_the_pipeline_scale():
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    torch.manual_seed(0)
    vae = vae_lib.build_vae().eval().requires_grad_(False)
    before = vae.decode(vae.encode(vae_lib.to_pixels(images)).latent_dist.mean).sample
    k = vae_lib.match_latent_scale(vae, images)
    assert k > 0
    posterior = vae.encode(vae_lib.to_pixels(images)).latent_dist
    torch.testing.assert_close(vae.decode(posterior.mean).sample, before, rtol=1e-4, atol=1e-4)
    scaled = vae_lib.encode_samples(vae, images) * vae_lib.LATENT_SCALE
    assert abs(scaled.std().item() - 1) < 1e-3  # what the SiT sees, with the same posterior draws


def test_frechet_distance_of_shifted_gaussians():
    features = np.random.default_rng(0).standard_normal((2000, 8))
    assert scoring.frechet_distance(features, features) == pytest.approx(0, abs=1e-6)
    shift = np.arange(8.0)
    assert scoring.frechet_distance(features, features + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)


def test_the_sample_count_must_give_every_digit_as_many(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_demo.parse_args(["--num-samples", "25"])
    assert exit_info.value.code == 2 and "--num-samples 25" in capsys.readouterr().err
