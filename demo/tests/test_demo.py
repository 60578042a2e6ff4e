"""The demo end to end with a tiny budget and two seeds (a subprocess, as `bash demo.sh` runs it), and its own
pieces: the exact latent rescaling of the VAE, the Frechet distance, the linear probe, the seeds table."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import plots
import probe
import run_demo
import scoring
import seeds
import vae as vae_lib
from conftest import TREE

SAMPLES = 20
TIMES = [0.3, 0.7]
# One thread per process: the other tests share the cores (pytest-xdist)
TINY_BUDGET = ["--vae-steps", "20", "--train-steps", "10", "--batch-size", "16", "--num-samples", str(SAMPLES),
               "--sampling-steps", "3", "--classifier-epochs", "1", "--times", *map(str, TIMES), "--threads", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`run_demo.py --compare --seeds 0 1` with a tiny budget: (output folder, stdout)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run([sys.executable, str(TREE / "run_demo.py"), "--out", str(out), "--compare",
                             "--seeds", "0", "1", *TINY_BUDGET],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return out, result.stdout


def test_data_vae_and_latents_have_the_real_formats(demo_run):
    out, _ = demo_run
    names = {}
    for part, folder, count in (("train", "data/images", 4000), ("held-out", "held-out", 1000)):
        images = json.loads((out / "seed-0" / folder / "dataset.json").read_text())["labels"]
        assert len(images) == count and sorted({label for _, label in images}) == list(range(10))
        with Image.open(out / "seed-0" / folder / images[0][0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
        names[part] = {path.name for path in (out / "seed-0/digits" / part).glob("*/*.png")}
    assert not names["train"] & names["held-out"] and len(names["train"] | names["held-out"]) == 5000
    latents = json.loads((out / "seed-0/data/vae-sd/dataset.json").read_text())["labels"]
    assert len(latents) == 4000  # the SiT never sees the held-out digits
    moments = np.load(out / "seed-0/data/vae-sd" / latents[0][0])
    assert moments.shape == (8, 4, 4) and moments.dtype == np.float32
    assert (out / "seed-0/vae/config.json").is_file()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("run", ["sra", "baseline"])
def test_each_run_writes_checkpoint_grids_npz_and_pca(demo_run, run, seed):
    out = demo_run[0] / f"seed-{seed}"
    assert (out / f"exps/{run}/checkpoints/step-10.pt").is_file()
    assert len((out / f"exps/{run}/losses.jsonl").read_text().splitlines()) == 10
    with Image.open(out / f"exps/{run}/samples/step-10.png") as grid:
        assert grid.size == (8 * 32, 8 * 32)  # the 64-image grid of train.py
    with Image.open(out / f"samples-{run}.png") as by_digit:
        assert by_digit.size == (SAMPLES // 10 * 32, 10 * 32)  # one row per digit
    (npz,) = (out / "samples" / run).glob("*.npz")
    samples = np.load(npz)["arr_0"]
    assert samples.shape == (SAMPLES, 32, 32, 3) and samples.dtype == np.uint8
    assert len(list(npz.with_suffix("").glob("*.png"))) == SAMPLES
    with Image.open(out / f"pca-{run}.png") as pca:
        assert pca.mode == "RGB" and pca.width > pca.height  # 2 noise levels x (input + 6 blocks)


@pytest.mark.parametrize("chart", ["probe.png", "curves.png"])
def test_the_charts_are_pngs_that_show_something(demo_run, chart):
    with Image.open(demo_run[0] / "seed-1" / chart) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.01  # lines, axes and labels on the white background


def test_metrics_json_and_the_printed_report(demo_run):
    out, stdout = demo_run
    metrics = json.loads((out / "seed-1/metrics.json").read_text())
    assert 0 <= metrics["classifier"]["held_out_accuracy"] <= 1
    assert metrics["classifier"]["held_out_digits"] == 1000 and metrics["classifier"]["train_digits"] == 4000
    assert set(metrics["references"]) == {"real_digits", "vae_reconstructions"}
    assert set(metrics["runs"]) == {"sra", "baseline"}
    for result in [*metrics["references"].values(), *metrics["runs"].values()]:
        assert 0 <= result["conditional_accuracy"] <= 1
        assert len(result["per_class_accuracy"]) == 10
        assert math.isfinite(result["frechet_distance"]) and result["frechet_distance"] >= 0
    for result in metrics["runs"].values():
        accuracy = np.array(result["probe"]["accuracy"])
        assert result["probe"]["times"] == TIMES and accuracy.shape == (len(TIMES), 6)
        assert np.all((0 <= accuracy) & (accuracy <= 1))
        assert result["probe_summary"] == pytest.approx({"block_2": accuracy[:, 1].mean(),
                                                         "best_block": accuracy.max(axis=1).mean()})
    assert metrics["settings"]["seed"] == 1 and metrics["timings_s"]["total"] > 0
    report = stdout[stdout.index("=== artifacts"):]
    for path in [str(out / "seed-1/metrics.json"), str(out / "seed-1/pca-sra.png"), str(out / "seed-1/probe.png"),
                 str(out / "seed-1/curves.png"), str(out / "seed-1/exps/baseline/samples/step-10.png")]:
        assert path in report
    assert "conditional accuracy" in report and "linear probe accuracy" in report


def test_the_seeds_table_holds_mean_std_and_difference_of_both_seeds(demo_run):
    out, stdout = demo_run
    per_seed = [json.loads((out / f"seed-{seed}/metrics.json").read_text())["runs"] for seed in (0, 1)]
    table = json.loads((out / "seeds.json").read_text())
    assert table["seeds"] == [0, 1] and table["runs"] == ["sra", "baseline"]
    keys = ["conditional_accuracy", "frechet_distance"]
    for row, key in zip(table["rows"], [*keys, "block_2", "best_block"]):
        for name in ("sra", "baseline"):
            values = [runs[name][key] if key in keys else runs[name]["probe_summary"][key] for runs in per_seed]
            run = row["runs"][name]
            assert run["values"] == pytest.approx(values)
            assert run["mean"] == pytest.approx((values[0] + values[1]) / 2)
            assert run["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))  # ddof 1 of two values
        sra, baseline = row["runs"]["sra"], row["runs"]["baseline"]
        assert row["difference"] == pytest.approx(sra["mean"] - baseline["mean"])
        assert row["beyond_spread"] == (abs(row["difference"]) > max(sra["std"], baseline["std"]))
    markdown = (out / "seeds.md").read_text()
    assert markdown.count("\n| ") == 2 + len(table["rows"]) and "| conditional accuracy |" in markdown
    assert markdown in stdout


def test_precision_check_compares_bf16_with_fp32_of_the_same_seeds_and_fp32_of_others(demo_run):
    out = demo_run[0] / "seed-0"
    result = subprocess.run([sys.executable, str(TREE / "precision_check.py"), "--out", str(out), "--num-samples",
                             str(SAMPLES), "--sampling-steps", "3", "--classifier-epochs", "1"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    report = json.loads((out / "precision.json").read_text())
    assert report["num_samples"] == SAMPLES and report["checkpoint"].endswith("exps/sra/checkpoints/step-10.pt")
    assert set(report["sets"]) == {"fp32, seed A", "bf16, seed A", "fp32, seed B"}
    assert report["bf16_vs_fp32_same_seeds_pixels"]["mean_abs_diff"] < 2  # same noise: bf16 rounding only
    assert abs(report["frechet_bf16_vs_fp32_same_seeds"]) < report["frechet_fp32_vs_fp32_other_seeds"]
    assert report["table"] in result.stdout and "| bf16 vs fp32, same seeds |" in report["table"]
    for name in ("fp32-a", "bf16-a", "fp32-b"):
        assert len(list((out / "precision" / name).glob("*.npz"))) == 1


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


def test_the_probe_reads_a_linear_separation_and_finds_nothing_in_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)  # sorted by class, as the held-out digits
    noise = rng.standard_normal((1000, 64))
    separated = noise + 3 * np.eye(10)[labels] @ rng.standard_normal((10, 64))  # a class-dependent offset
    assert probe.linear_probe(separated, labels) == 1.0
    assert 0.04 < probe.linear_probe(noise, labels) < 0.17  # chance is 0.1; 500 test digits


def test_block_features_are_the_token_means_of_model_features():
    torch.manual_seed(0)
    model = probe.SiT_models["SiT-T/1"](input_size=2, num_classes=10).eval()
    for block in model.blocks:  # adaLN-zero starts every block as the identity: give them something to do
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    x_t = torch.randn(5, 4, 2, 2)
    features = probe.block_features(model, x_t, 0.3, batch_size=2)
    assert features.shape == (6, 5, 192)
    null = torch.full((5,), 10)
    with torch.no_grad():
        for depth in range(1, 7):
            expected = model.features(x_t, torch.full((5,), 0.3), null, depth=depth).mean(dim=1)
            torch.testing.assert_close(features[depth - 1], expected)
    assert not torch.allclose(features[0], features[-1])


def test_smooth_is_a_trailing_moving_average():
    np.testing.assert_allclose(plots.smooth([1, 2, 3, 4, 8], 2), [1, 1.5, 2.5, 3.5, 6])
    np.testing.assert_allclose(plots.smooth([4, 2], 5), [4, 3])


def test_the_seeds_table_says_when_a_difference_exceeds_the_spread():
    def metrics(accuracy, distance):
        return {"conditional_accuracy": accuracy, "frechet_distance": distance,
                "probe_summary": {"block_4": accuracy, "best_block": accuracy}}

    per_seed = {seed: {"runs": {"sra": metrics(0.9 + 0.01 * seed, 10.0 + seed),
                                "baseline": metrics(0.5 + 0.01 * seed, 10.5 + seed)}} for seed in (0, 1, 2)}
    table = seeds.summarise(per_seed, block=4)
    accuracy, distance = table["rows"][:2]
    assert accuracy["runs"]["sra"]["mean"] == pytest.approx(0.91) and accuracy["runs"]["sra"]["std"] == pytest.approx(0.01)
    assert accuracy["difference"] == pytest.approx(0.4) and accuracy["beyond_spread"]
    assert distance["difference"] == pytest.approx(-0.5) and not distance["beyond_spread"]  # stds of 1
    assert "| conditional accuracy | 91.0% ± 1.0% | 51.0% ± 1.0% | +40.0 pt | yes |" in seeds.markdown(table)
    with pytest.raises(ValueError, match="two or more seeds"):
        seeds.summarise({0: per_seed[0]}, block=4)


def test_budgets_fill_what_the_flags_leave_out():
    args = run_demo.parse_args(["--budget", "long", "--train-steps", "7"])
    assert (args.model, args.block_out_s, args.block_out_t) == ("SiT-Ti/1", 4, 8)
    assert probe.model_depth(args.model) == 12 and probe.model_depth(run_demo.parse_args([]).model) == 6
    assert args.train_steps == 7 and args.batch_size == run_demo.BUDGETS["long"]["batch_size"]
    assert run_demo.parse_args([]).model == "SiT-T/1"


@pytest.mark.parametrize("cores, processes, threads", [(2, 1, 2), (2, 2, 1), (1, 1, 1), (1, 2, 1), (16, 2, 2)])
def test_threads_share_the_cores_among_the_processes_at_most_two_each(monkeypatch, cores, processes, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert run_demo.threads_per_process(run_demo.parse_args([]), processes) == threads
    assert run_demo.threads_per_process(run_demo.parse_args(["--threads", "3"]), processes) == 3


@pytest.mark.parametrize("flags, message", [(["--seeds", "0", "1", "0"], "a seed is repeated"),
                                            (["--times", "0.5", "1.5"], "noise levels are in [0, 1]")])
def test_bad_seeds_and_times_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_demo.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
