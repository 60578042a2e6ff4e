"""The evaluator end to end: the .npz that SiT-SRA/generate.py writes, scored against a reference batch by the CLI
in a subprocess (random Inception weights in torch-fidelity's format), then its outputs checked against the
metric functions; the activation cache and the one-line errors in-process."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TREE, random_images, run_evaluator

import evaluator
import metrics
from errors import UserError, run_main
from inception import InceptionFeatures

SIT_TREE = TREE.parent / "SiT-SRA"
NUM_SAMPLES, NUM_REF, SPLIT = 8, 10, 4

# Run in SiT-SRA/ by a separate interpreter: evaluations/ imports nothing from the trees. A tiny SiT-T/2 (32 px,
# latent 4 x 4) whose zero-initialised adaLN and output layers are perturbed, so that samples differ; saved as the
# training checkpoint train.py writes.
TINY_CHECKPOINT = """
import argparse, sys, torch
from models import SiT_models
torch.manual_seed(0)
model = SiT_models["SiT-T/2"](input_size=4, num_classes=10, class_dropout_prob=0.1)
with torch.no_grad():
    for name, param in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            param.add_(0.05 * torch.randn_like(param))
state = model.state_dict()
args = argparse.Namespace(model="SiT-T/2", resolution=32, num_classes=10, cfg_prob=0.1)
torch.save({"model": state, "ema": state, "opt": {}, "args": args, "epoch": 1, "steps": 1}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def generated_npz(tmp_path_factory):
    """The .npz of SiT-SRA/generate.py (what gen.sh runs): 8 samples of 32 px from a random SiT and random VAE."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("generate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", TINY_CHECKPOINT, str(root / "ckpt.pt")], cwd=SIT_TREE, env=env, check=True)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                  block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32).save_pretrained(root / "vae")
    subprocess.run([sys.executable, "generate.py", "--ckpt", str(root / "ckpt.pt"), "--sample-dir", str(root / "out"),
                    "--model", "SiT-T/2", "--num-classes", "10", "--resolution", "32", "--vae", str(root / "vae"),
                    "--per-proc-batch-size", str(NUM_SAMPLES), "--num-fid-samples", str(NUM_SAMPLES),
                    "--num-steps", "2"], cwd=SIT_TREE, env=env, check=True, capture_output=True)
    (npz,) = (root / "out").glob("*.npz")
    return npz


@pytest.fixture(scope="module")
def features(inception_weights):
    return InceptionFeatures(inception_weights, "cpu")


def test_scores_generate_npz_against_a_reference_with_stored_statistics(generated_npz, inception_weights,
                                                                        features, tmp_path):
    """The reference batch stores mu = 0, sigma = 0, so FID = |mu|^2 + tr(sigma) of the samples' statistics (those
    it saves with --save-stats); its images give precision and recall, through the activation cache."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(NUM_REF, size=32, seed=1), mu=np.zeros(2048), sigma=np.zeros((2048, 2048)),
             mu_s=np.zeros(2023), sigma_s=np.zeros((2023, 2023)))
    result = run_evaluator(ref, generated_npz, "--device", "cpu", "--batch-size", "3", "--inception-weights",
                           inception_weights, "--split-size", SPLIT, "--cache-dir", tmp_path / "cache",
                           "--save-stats", tmp_path / "stats.npz", "--json", tmp_path / "out.json")

    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    values = [float(line.split(": ")[1]) for line in lines]
    assert all(math.isfinite(v) for v in values)
    assert json.loads((tmp_path / "out.json").read_text()) == {
        "ref_batch": str(ref), "sample_batch": str(generated_npz),
        **dict(zip(["inception_score", "fid", "sfid", "precision", "recall"], values, strict=True))}
    assert f"using the statistics stored in {ref}" in result.stderr

    with np.load(tmp_path / "stats.npz") as stats:
        assert {key: stats[key].shape for key in stats.files} == {
            "mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
        # the .npz of generate.py goes in unchanged: its arr_0 through the network gives the saved statistics
        pool, spatial = features(np.load(generated_npz)["arr_0"])
        assert np.allclose(stats["mu"], pool.mean(0).numpy(), rtol=1e-5, atol=1e-6)
        assert np.allclose(stats["sigma_s"], np.cov(spatial.numpy(), rowvar=False), rtol=1e-4, atol=1e-6)
        assert values[1] == pytest.approx(stats["mu"] @ stats["mu"] + np.trace(stats["sigma"]), rel=1e-6)
        assert values[2] == pytest.approx(stats["mu_s"] @ stats["mu_s"] + np.trace(stats["sigma_s"]), rel=1e-6)

    (cache,) = (tmp_path / "cache").glob("ref-inception-*.npz")
    with np.load(cache) as cached:
        assert cached["pool"].shape == (NUM_REF, 2048) and cached["spatial"].shape == (NUM_REF, 2023)
        ref_pool = cached["pool"]
    probs = metrics.class_probabilities(pool, features.logits_weight)
    assert values[0] == pytest.approx(metrics.inception_score(probs, SPLIT), rel=1e-5)
    assert tuple(values[3:]) == metrics.precision_recall(ref_pool, pool.numpy())


def test_second_run_reads_the_reference_activations_from_the_cache(features, inception_weights, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(4, size=32, seed=3))
    args = evaluator.parse_args([str(ref), str(ref), "--batch-size", "4", "--inception-weights", str(inception_weights),
                                 "--cache-dir", str(tmp_path / "cache")])
    calls = []
    hook = features.net.register_forward_pre_hook(lambda module, inputs: calls.append(len(inputs[0])))
    try:
        first = evaluator.reference_activations(args, features)
        assert calls == [4] and "cached reference activations in" in capsys.readouterr().err
        second = evaluator.reference_activations(args, features)
        assert calls == [4] and "reading cached reference activations" in capsys.readouterr().err
        np.savez(ref, arr_0=random_images(4, size=32, seed=4))  # a rewritten file of the same name and size
        third = evaluator.reference_activations(args, features)
        assert calls == [4, 4]
    finally:
        hook.remove()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], third[0])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    """Through run_main, as the script runs: `error: <message>` on stderr, exit status 2, nothing on stdout."""
    np.savez(tmp_path / "ref.npz", arr_0=random_images(10, size=8))
    np.savez(tmp_path / "few.npz", arr_0=random_images(6, size=8))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "few.npz"), "--device", "cpu"]))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {tmp_path / 'few.npz'}: 6 samples are fewer than one Inception Score split "
                                 f"of 5000 (--split-size)\n")


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "tpu9"], "--device tpu9: not a device"),
    (["--json", "no/such/dir/out.json"], "--json no/such/dir/out.json: the folder no/such/dir does not exist"),
])
def test_bad_flags_name_the_flag(tmp_path, extra, message):
    np.savez(tmp_path / "a.npz", arr_0=random_images(5, size=8))
    with pytest.raises(UserError, match=message):
        evaluator.main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--split-size", "5", *extra])


def test_reference_batches_need_more_images_than_k(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(3, size=8))
    np.savez(tmp_path / "sample.npz", arr_0=random_images(5, size=8))
    with pytest.raises(UserError, match=r"ref.npz: 3 images; precision/recall need more than 3"):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--split-size", "5"])


def test_read_ahead_keeps_the_order_and_passes_errors_on():
    def batches():
        yield from range(5)
        raise UserError("broken.npz: arr_0 is truncated")

    seen = []
    with pytest.raises(UserError, match="broken.npz"):
        for item in evaluator.read_ahead(batches()):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
