"""The evaluator end to end: the .npz that SiT-SRA/generate.py writes, scored against a reference batch by the CLI
in a subprocess (random Inception weights in torch-fidelity's format), then its outputs checked against the
metric functions; the activation cache and the one-line errors in-process."""
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TREE, random_images, run_evaluator
from test_metrics import suite_precision_recall

import evaluator
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
    return InceptionFeatures(inception_weights, "cpu", verify=False)  # random weights: not the published checksum


def independent_inception_score(pool, logits_weight, split_size):
    """softmax(pool @ W^T) in float64 numpy, then the mean over splits of exp(mean_i sum_c p_ic log(p_ic / q_c))."""
    logits = pool.astype(np.float64) @ logits_weight.numpy().astype(np.float64).T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        p = probs[start:start + split_size]
        scores.append(np.exp(np.mean(np.sum(p * np.log(p / p.mean(0)), axis=1))))
    return np.mean(scores)


def fid_against_isotropic(mu, sigma, mu_ref, scale):
    """The Frechet distance to N(mu_ref, scale I): |mu - mu_ref|^2 + tr(sigma) + D scale - 2 sqrt(scale) tr(sigma^(1/2)),
    the last trace from sigma's eigenvalues."""
    eigenvalues = np.clip(np.linalg.eigvalsh(sigma), 0, None)
    return (np.sum((mu - mu_ref) ** 2) + np.trace(sigma) + len(mu) * scale
            - 2 * np.sqrt(scale) * np.sum(np.sqrt(eigenvalues)))


def test_scores_generate_npz_against_a_reference_with_stored_statistics(generated_npz, inception_weights,
                                                                        features, tmp_path):
    """The reference batch stores mu = 0.5, sigma = 0.3 I (mu_s = 0.2, sigma_s = 0.1 I), so FID and sFID have closed
    forms in the samples' statistics (those --save-stats writes); its images give precision and recall, through the
    activation cache. Every figure is checked against a computation written here (or the suite's float16 distances)."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(NUM_REF, size=32, seed=1), mu=np.full(2048, 0.5), sigma=0.3 * np.eye(2048),
             mu_s=np.full(2023, 0.2), sigma_s=0.1 * np.eye(2023))
    result = run_evaluator(ref, generated_npz, "--device", "cpu", "--batch-size", "3", "--inception-weights",
                           inception_weights, "--unverified-weights", "--split-size", SPLIT, "--cache-dir",
                           tmp_path / "cache", "--save-stats", tmp_path / "stats.npz", "--json", tmp_path / "out.json")

    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    values = [float(line.split(": ")[1]) for line in lines]
    assert json.loads((tmp_path / "out.json").read_text()) == {
        "ref_batch": str(ref), "sample_batch": str(generated_npz),
        **dict(zip(["inception_score", "fid", "sfid", "precision", "recall"], values, strict=True)),
        "ref_images": NUM_REF, "sample_images": NUM_SAMPLES, "split_size": SPLIT,
        "ref_statistics": "file", "sample_statistics": "images",
        "inception_weights_sha256": hashlib.sha256(inception_weights.read_bytes()).hexdigest(),
        "inception_weights_verified": False, "torch": torch.__version__,
        "torch_fidelity": importlib.metadata.version("torch-fidelity")}
    assert f"FID and sFID use the statistics stored in {ref} (ref batch)" in result.stderr
    assert "accepted unverified (--unverified-weights)" in result.stderr

    # the .npz of generate.py goes in unchanged: its arr_0 through the network gives the saved statistics
    pool, spatial = (x.numpy() for x in features(np.load(generated_npz)["arr_0"]))
    with np.load(tmp_path / "stats.npz") as stats:
        assert np.allclose(stats["mu"], pool.mean(0), rtol=1e-5, atol=1e-6)
        assert np.allclose(stats["sigma"], np.cov(pool, rowvar=False), rtol=1e-4, atol=1e-6)
        assert np.allclose(stats["mu_s"], spatial.mean(0), rtol=1e-5, atol=1e-6)
        assert np.allclose(stats["sigma_s"], np.cov(spatial, rowvar=False), rtol=1e-4, atol=1e-6)
        fid = fid_against_isotropic(stats["mu"], stats["sigma"], 0.5, 0.3)
        sfid = fid_against_isotropic(stats["mu_s"], stats["sigma_s"], 0.2, 0.1)
    assert values[1] == pytest.approx(fid, rel=1e-5) and values[2] == pytest.approx(sfid, rel=1e-5)
    # compared as log IS, the mean KL divergence: a random network gives IS just above 1
    expected_is = independent_inception_score(pool, features.logits_weight, SPLIT)
    assert np.log(values[0]) == pytest.approx(np.log(expected_is), rel=1e-3) and expected_is > 1.001

    (cache,) = (tmp_path / "cache").glob("ref-inception-*.npz")
    with np.load(cache) as cached:
        ref_pool = cached["pool"]
    assert np.allclose(ref_pool, features(np.load(ref)["arr_0"])[0].numpy(), rtol=1e-5, atol=1e-6)
    assert tuple(values[3:]) == suite_precision_recall(torch.from_numpy(ref_pool), torch.from_numpy(pool), 10_000)


def test_statistics_stored_in_the_sample_batch_are_used_and_fewer_samples_than_a_split_are_one_split(
        inception_weights, features, tmp_path, capsys):
    """Both files store statistics (N(0.5, 0.3 I) and N(0.1, 0.2 I); sFID: N(0, I) and N(1, 4 I)), so FID and sFID are
    the closed forms of those Gaussians whatever the images; 6 samples against the default split of 5000 are scored
    as one split, with a warning, as the suite does."""
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=random_images(5, size=16, seed=1), mu=np.full(2048, 0.5), sigma=0.3 * np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    sample_images = random_images(6, size=16, seed=2)
    np.savez(sample, arr_0=sample_images, mu=np.full(2048, 0.1), sigma=0.2 * np.eye(2048), mu_s=np.ones(2023),
             sigma_s=4 * np.eye(2023))
    evaluator.main([str(ref), str(sample), "--device", "cpu", "--inception-weights", str(inception_weights),
                    "--unverified-weights", "--json", str(tmp_path / "out.json")])
    out, err = capsys.readouterr()
    values = dict(line.split(": ") for line in out.splitlines())
    assert float(values["FID"]) == pytest.approx(2048 * (0.4 ** 2 + 0.3 + 0.2 - 2 * np.sqrt(0.06)), rel=1e-9)
    assert float(values["sFID"]) == pytest.approx(2023 * (1 + 1 + 4 - 2 * 2), rel=1e-9)
    pool = features(sample_images)[0].numpy()
    assert float(values["Inception Score"]) == pytest.approx(independent_inception_score(pool, features.logits_weight,
                                                                                         6), rel=1e-4)
    assert f"FID and sFID use the statistics stored in {sample} (sample batch), not its images" in err
    assert f"FID and sFID use the statistics stored in {ref} (ref batch), not its images" in err
    assert (f"warning: {sample}: 6 samples are fewer than one Inception Score split of 5000 (--split-size): scored as "
            f"one split of 6, as the suite does\n") in err
    assert f"warning: {sample}: 6 samples; figures from fewer than 50,000 are not comparable with the paper's" in err
    provenance = json.loads((tmp_path / "out.json").read_text())
    assert (provenance["ref_statistics"], provenance["sample_statistics"], provenance["split_size"]) == ("file", "file",
                                                                                                        5000)


def test_second_run_reads_the_reference_activations_from_the_cache(features, inception_weights, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(4, size=32, seed=3))
    args = evaluator.parse_args([str(ref), str(ref), "--batch-size", "4", "--cache-dir", str(tmp_path / "cache")])
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


def test_weights_of_another_checksum_are_one_line_naming_the_file(inception_weights, tmp_path, capsys):
    """Through run_main, as the script runs: without --unverified-weights the random weights are refused with
    `error: <message>` on stderr, exit status 2, nothing on stdout."""
    np.savez(tmp_path / "ref.npz", arr_0=random_images(5, size=8))
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--device", "cpu",
                                         "--split-size", "5", "--inception-weights", str(inception_weights)]))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    error = err.splitlines()[-1]  # after the warning that 5 samples are fewer than the paper's 50,000
    assert out == "" and error.startswith(f"error: {inception_weights}: SHA-256 ") and err.endswith(error + "\n")
    assert "is not the published 6726825d" in error and "weights-inception-2015-12-05-6726825d.pth from https" in error


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
