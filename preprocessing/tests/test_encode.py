"""`encode` with a tiny random VAE: values, format, batch independence, zip source, unreadable
images, resume, and a two-process torchrun."""
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import dataset_tools as dt


@pytest.fixture(scope="module")
def expected_labels(images_dir):
    """dataset.json's labels for the encode source: its image names mapped to latent names, sorted."""
    labels = json.loads((images_dir / "dataset.json").read_text())["labels"]
    return sorted([name.replace("/img", "/img-mean-std-").replace(".png", ".npy"), label] for name, label in labels)


def encode_argv(source, dest, vae, *extra, workers=0):
    return ["encode", f"--source={source}", f"--dest={dest}", f"--model-url={vae}", f"--workers={workers}", *extra]


def test_output_format(encoded, read_tree, expected_labels):
    dest, process = encoded
    assert json.loads((dest / "dataset.json").read_text()) == {"labels": expected_labels}
    assert set(read_tree(dest)) == {"dataset.json"} | {name for name, _ in expected_labels}
    for name, _ in expected_labels:
        array = np.load(dest / name)
        assert array.dtype == np.float32 and array.shape == (8, 5, 5)
    assert process.stdout.strip().splitlines()[-1] == f"encoded {len(expected_labels)} images"


def test_moments_equal_a_direct_vae_encode(encoded, images_dir, tiny_vae_dir, expected_labels):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    dest, _ = encoded
    for name, _ in expected_labels:
        with PIL.Image.open(images_dir / name.replace("img-mean-std-", "img").replace(".npy", ".png")) as img:
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        expected = torch.cat([posterior.mean, posterior.std], dim=1)[0].numpy()
        stored = np.load(dest / name)
        np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-5)


def test_batch_size_does_not_change_the_result(encoded, images_dir, tiny_vae_dir, tmp_path, expected_labels):
    """Batch 1 and batch 7 agree to float32 rounding (atol 1e-5, as the comparison with vae.encode above;
    seen: up to 1.3e-6 on values of 0.5 and 1.7e-6 on 0.04): oneDNN blocks convolutions differently per
    batch size. Not bit for bit, which is why a resumed run must rebuild the same batches."""
    dest = tmp_path / "vae-sd"
    assert dt.main(encode_argv(images_dir, dest, tiny_vae_dir, "--batch-size=1")) == 0
    assert (dest / "dataset.json").read_bytes() == (encoded[0] / "dataset.json").read_bytes()
    for name, _ in expected_labels:
        np.testing.assert_allclose(np.load(dest / name), np.load(encoded[0] / name), rtol=0, atol=1e-5)


def test_zip_source_gives_identical_files(encoded, images_dir, tiny_vae_dir, tmp_path, read_tree):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(images_dir.rglob("*")):
            z.write(path, path.relative_to(images_dir).as_posix())
    dest = tmp_path / "vae-sd"
    assert dt.main(encode_argv(archive, dest, tiny_vae_dir, "--batch-size=7", workers=2)) == 0
    assert read_tree(dest) == read_tree(encoded[0])


def test_unreadable_image_is_skipped_and_named(encoded, images_dir, tiny_vae_dir, tmp_path, capsys, expected_labels):
    source = tmp_path / "images"
    shutil.copytree(images_dir, source)
    (source / "00000/img00000006.png").write_bytes(b"broken")
    dest = tmp_path / "vae-sd"
    assert dt.main(encode_argv(source, dest, tiny_vae_dir, "--batch-size=7")) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "encoded 10 images, skipped 1 unreadable: 00000/img00000006.png"
    assert "warning: skipping unreadable 00000/img00000006.png" in err
    labels = json.loads((dest / "dataset.json").read_text())["labels"]
    assert labels == [entry for entry in expected_labels if entry[0] != "00000/img-mean-std-00000006.npy"]
    for name, _ in labels:  # the black stand-in leaves its batch-mates' bytes unchanged
        assert (dest / name).read_bytes() == (encoded[0] / name).read_bytes()


def test_interrupted_and_damaged_run_resumes_to_identical_files(encoded, images_dir, tiny_vae_dir, tmp_path,
                                                                monkeypatch, read_tree, capsys):
    dest = tmp_path / "vae-sd"
    argv = encode_argv(images_dir, dest, tiny_vae_dir, "--batch-size=3")
    reference = tmp_path / "reference"
    assert dt.main(encode_argv(images_dir, reference, tiny_vae_dir, "--batch-size=3")) == 0
    encode_batch, calls = dt.encode_batch, []

    def encode_then_interrupt(vae, images):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the 3rd batch
        return encode_batch(vae, images)

    monkeypatch.setattr(dt, "encode_batch", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dt.main(argv)
    monkeypatch.undo()
    assert len(read_tree(dest)) == 6 and not (dest / "dataset.json").exists()
    # One file cut short, one deleted (the rest of its batch stays), and a temp file left by a killed write.
    truncated = dest / "00000/img-mean-std-00000000.npy"
    truncated.write_bytes(truncated.read_bytes()[:90])
    (dest / "00000/img-mean-std-00000005.npy").unlink()
    (dest / "00000/.img-mean-std-00000007.npy.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert dt.main(argv) == 0
    assert "(4 already done)" in capsys.readouterr().out
    assert read_tree(dest) == read_tree(reference)


def test_torchrun_two_processes_share_the_work(encoded, images_dir, tiny_vae_dir, tmp_path, cli, expected_labels):
    """Each process takes every 2nd image; rank 0 writes dataset.json. Batches differ from a
    single-process run, so values agree to float32 rounding rather than bit for bit."""
    dest = tmp_path / "vae-sd"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
                "dataset_tools.py"]
    process = cli("encode", f"--source={images_dir}", f"--dest={dest}", f"--model-url={tiny_vae_dir}",
                  "--batch-size=7", "--workers=0", command=torchrun)
    assert process.returncode == 0, process.stderr
    assert f"encoded {len(expected_labels)} images" in process.stdout
    assert (dest / "dataset.json").read_bytes() == (encoded[0] / "dataset.json").read_bytes()
    for name, _ in expected_labels:
        np.testing.assert_allclose(np.load(dest / name), np.load(encoded[0] / name), rtol=0, atol=1e-5)


def test_zip_destination_is_refused(images_dir, tmp_path, capsys):
    assert dt.main(encode_argv(images_dir, tmp_path / "vae-sd.zip", "unused")) == 2
    assert "encode writes a folder" in capsys.readouterr().err


def test_a_missing_local_model_folder_is_a_user_error(images_dir, tmp_path, capsys):
    missing = tmp_path / "no-such-vae"
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network, even for a path that looks like a hub name
    assert dt.main(encode_argv(images_dir, tmp_path / "vae-sd", missing)) == 2
    assert capsys.readouterr().err.startswith(f"error: --model-url {missing}: cannot load an AutoencoderKL")
