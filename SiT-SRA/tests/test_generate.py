"""End-to-end tests of generate.py on CPU: a tiny SiT-S/2 at 32 px (latent 4x4), a random local VAE, 10 samples.

Sampling runs are subprocesses, as a user launches them (python, or torchrun with 2 gloo processes); the error cases
run in-process through utils.run_main (one subprocess, another architecture, checks the real exit status).
The model-independent helpers (seeds, PNGs, the .npz writer) are tested in test_sampling_io.py.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

import generate
from models import SiT_models
from sampling_io import fill_unset_flags
from utils import UserError, load_checkpoint, run_main

RES, N, BATCH, CLASSES = 32, 10, 4, 10


def tiny_state_dict(model_name="SiT-S/2", num_classes=CLASSES, seed=0):
    """A SiT state dict whose zero-initialised adaLN and output layers are perturbed, so samples are not trivial."""
    torch.manual_seed(seed)
    model = SiT_models[model_name](input_size=RES // 8, num_classes=num_classes, class_dropout_prob=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.add_(0.05 * torch.randn_like(param))
    return model.state_dict()


def training_checkpoint(state_dict, model_name="SiT-S/2", num_classes=CLASSES):
    """The dict train.py writes; `model` and `ema` share tensors, so torch.save stores them once."""
    args = argparse.Namespace(model=model_name, resolution=RES, num_classes=num_classes, cfg_prob=0.1)
    return {"model": state_dict, "ema": state_dict, "opt": {}, "args": args, "epoch": 3, "steps": 100}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step-100.pt"
    torch.save(training_checkpoint(tiny_state_dict()), path)
    return path


def argv(ckpt, sample_dir, vae_dir, *extra):
    """generate.py's command line for the tiny setting: SDE, 5 steps, guided on the interval [0.2, 0.7]."""
    return ["generate.py", "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--model", "SiT-S/2",
            "--num-classes", str(CLASSES), "--resolution", str(RES), "--vae", str(vae_dir),
            "--per-proc-batch-size", str(BATCH), "--num-fid-samples", str(N), "--num-steps", "5",
            "--cfg-scale", "4.0", "--guidance-low", "0.2", "--guidance-high", "0.7", *extra]


def the_npz(sample_dir):
    """The one .npz of a sample dir (asserting there is exactly one) and the folder of its PNGs."""
    npzs = sorted(sample_dir.glob("*.npz"))
    assert len(npzs) == 1, npzs
    return npzs[0], npzs[0].with_suffix("")


def run_generate(ckpt, sample_dir, vae_dir, *extra):
    run_script(*argv(ckpt, sample_dir, vae_dir, *extra))
    return the_npz(sample_dir)


@pytest.fixture(scope="module")
def base_run(ckpt, tiny_vae_dir, tmp_path_factory):
    """One uninterrupted single-process run with seed 0: (npz path, PNG folder)."""
    return run_generate(ckpt, tmp_path_factory.mktemp("base"), tiny_vae_dir)


# ---------------------------------------------------------------------------------------------- in-process units

def parse_for_bare_state_dict(argv):
    """parse_args, then the flags a checkpoint without args leaves unset filled with the released defaults."""
    return fill_unset_flags(generate.parse_args(argv), None, generate.RELEASED_DEFAULTS)


def test_flag_errors_name_the_flag():
    base = ["--ckpt", "x.pt"]
    generate.check_flags(parse_for_bare_state_dict(base))  # the released defaults
    for bad in (["--num-steps", "0"], ["--heun"], ["--resolution", "30"], ["--global-seed", "-1"],
                ["--guidance-low", "0.8", "--guidance-high", "0.7"]):
        with pytest.raises(UserError, match=bad[0]):
            generate.check_flags(parse_for_bare_state_dict(base + bad))


def test_direct_call_defaults_are_the_released_generate_py(tmp_path):
    args = parse_for_bare_state_dict(["--ckpt", "x.pt"])
    assert (args.model, args.resolution, args.num_classes, args.path_type, args.mode, args.num_steps, args.cfg_scale,
            args.guidance_low, args.guidance_high, args.per_proc_batch_size, args.num_fid_samples, args.vae,
            args.global_seed, args.tf32) == (
        "SiT-B/2", 256, 1000, "linear", "sde", 50, 1.8, 0.0, 1.0, 32, 50_000, "ema", 0, True)
    assert generate.parse_args(["--ckpt", "x.pt", "--local-rank=3"]).local_rank == 3  # torch.distributed.launch
    assert generate.parse_args(["--ckpt", "x.pt", "--local_rank", "3"]).local_rank == 3


def test_unset_model_flags_come_from_the_checkpoint_and_a_given_flag_wins(tmp_path):
    path = tmp_path / "cosine.pt"
    checkpoint = training_checkpoint(tiny_state_dict())
    checkpoint["args"].path_type = "cosine"
    torch.save(checkpoint, path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS)
    assert (args.model, args.resolution, args.num_classes, args.path_type) == ("SiT-S/2", RES, CLASSES, "cosine")
    args = generate.parse_args(["--ckpt", str(path), "--model", "SiT-B/4", "--resolution", "64", "--path-type", "linear"])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS)
    assert (args.model, args.resolution, args.num_classes, args.path_type) == ("SiT-B/4", 64, CLASSES, "linear")
    checkpoint["args"].model = "SiT-Q/2"
    torch.save(checkpoint, path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS)
    with pytest.raises(UserError, match="trained with --model SiT-Q/2 --path-type cosine"):
        generate.check_flags(args)


def test_a_run_without_model_flags_samples_as_the_checkpoints_args_say(base_run, ckpt, tiny_vae_dir, tmp_path):
    flags = argv(ckpt, tmp_path, tiny_vae_dir)
    for flag in ("--model", "--num-classes", "--resolution"):
        del flags[flags.index(flag):flags.index(flag) + 2]
    run_script(*flags)
    npz, _ = the_npz(tmp_path)
    assert npz.name == base_run[0].name and npz.read_bytes() == base_run[0].read_bytes()


@pytest.mark.parametrize("resolution, cfg", [("256", 1.8), ("512", 2.5)])
def test_gen_sh_passes_the_released_settings(resolution, cfg, tmp_path):
    """gen.sh with a stand-in torchrun that records its arguments; generate.py must accept them."""
    (tmp_path / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    (tmp_path / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"),
           "RESOLUTION": resolution, "CKPT": "my.pt", "NUM_GPUS": "4"}
    subprocess.run(["bash", "gen.sh"], cwd=Path(generate.__file__).parent, env=env, check=True)
    recorded = (tmp_path / "args").read_text().splitlines()
    assert recorded[:3] == ["--nnodes=1", "--nproc_per_node=4", "generate.py"]
    args = generate.parse_args(recorded[3:])
    generate.check_flags(args)
    assert (args.ckpt, args.model, args.resolution, args.vae, args.per_proc_batch_size, args.num_fid_samples,
            args.mode, args.num_steps, args.cfg_scale, args.guidance_low, args.guidance_high, args.global_seed) == (
        "my.pt", "SiT-XL/2", int(resolution), "ema", 64, 50_000, "sde", 250, cfg, 0.0, 0.7, 0)


# ---------------------------------------------------------------------------------------------- end to end

def test_writes_pngs_and_one_npz_in_index_order(base_run):
    npz, folder = base_run
    assert folder.name == ("SiT-S-2-step-100-size-32-vae-vae0-cfg-4.0-seed-0-sde-steps-5-interval-0.2-0.7-linear-fp32"
                           "-classes-10")
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(N)]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in pngs]  # no temporary files left
    for i, path in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(path)), arr[i])
    assert len({arr[i].tobytes() for i in range(N)}) == N  # the samples are not trivial copies of each other


def test_class_balanced_labels_are_the_index_modulo_the_classes(monkeypatch):
    seen = {}

    def sampler(model_fn, latents, labels, step_noise, **kwargs):
        seen["labels"], seen["noise"] = labels.tolist(), step_noise(latents)
        return latents.double()

    monkeypatch.setattr(generate, "euler_maruyama_sampler", sampler)
    monkeypatch.setattr(generate, "decode_to_uint8", lambda vae, latents: latents)
    flags = ["--ckpt", "c.pt", "--num-classes", str(CLASSES), "--resolution", str(RES), "--model", "SiT-S/2"]
    random_args, balanced_args = generate.parse_args(flags), generate.parse_args(flags + ["--class-balanced"])
    latents = generate.sample_batch(balanced_args, None, None, range(7, 19), torch.device("cpu"))
    assert seen["labels"] == [i % CLASSES for i in range(7, 19)]
    balanced_noise = seen["noise"]
    assert torch.equal(generate.sample_batch(random_args, None, None, range(7, 19), torch.device("cpu")), latents)
    assert seen["labels"] != [i % CLASSES for i in range(7, 19)]
    assert torch.equal(seen["noise"], balanced_noise)  # the label draw is still made: same step noise per seed
    assert generate.folder_name(balanced_args) == generate.folder_name(random_args) + "-balanced"


def test_same_seed_is_byte_identical_and_another_seed_differs(base_run, ckpt, tiny_vae_dir, tmp_path):
    again, _ = run_generate(ckpt, tmp_path / "again", tiny_vae_dir)
    assert again.read_bytes() == base_run[0].read_bytes()
    other, _ = run_generate(ckpt, tmp_path / "other", tiny_vae_dir, "--global-seed", "1")
    assert "seed-1" in other.name
    assert not np.array_equal(np.load(other)["arr_0"], np.load(base_run[0])["arr_0"])


def test_two_processes_give_the_npz_of_one(base_run, ckpt, tiny_vae_dir, tmp_path):
    run_script("torchrun", "--standalone", "--nproc_per_node", "2", *argv(ckpt, tmp_path, tiny_vae_dir))
    npz, _ = the_npz(tmp_path)
    assert npz.read_bytes() == base_run[0].read_bytes()


def test_samples_depend_on_their_index_not_on_the_batch_size(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, _ = run_generate(ckpt, tmp_path, tiny_vae_dir, "--per-proc-batch-size", "3")
    # Same noise, labels and step noise per index; only the float rounding of batched matmuls may differ.
    diff = np.abs(np.load(npz)["arr_0"].astype(int) - np.load(base_run[0])["arr_0"].astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_ode_with_heun_guidance_interval_and_bf16(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, folder = run_generate(ckpt, tmp_path, tiny_vae_dir, "--mode", "ode", "--heun", "--cfg-scale", "3.0",
                               "--guidance-low", "0.3", "--guidance-high", "0.8", "--precision", "bf16")
    assert "-ode-steps-5-heun-interval-0.3-0.8-" in folder.name and folder.name.endswith("bf16-classes-10")
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8 and len(list(folder.glob("*.png"))) == N
    assert not np.array_equal(arr, np.load(base_run[0])["arr_0"])


def test_resume_regenerates_only_damaged_batches_and_gives_the_same_npz(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, folder = base_run
    sample_dir = tmp_path / "resume"
    shutil.copytree(folder, sample_dir / folder.name)
    resumed = sample_dir / folder.name
    for i in (0, 1, 9):  # batches 0 and 2 lose PNGs; batch 1 (4..7) stays complete
        (resumed / f"{i:06d}.png").unlink()
    png = resumed / "000003.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # a half-written file
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(resumed / "000002.png")  # a valid PNG of the wrong size
    (resumed / ".000009.png.tmp").write_bytes(b"left by a killed run")
    untouched = {i: (resumed / f"{i:06d}.png").stat().st_mtime_ns for i in range(4, 8)}

    result = run_script(*argv(ckpt, sample_dir, tiny_vae_dir))
    assert "1 already done, 2 to generate" in result.stdout
    again, _ = the_npz(sample_dir)
    assert again.read_bytes() == npz.read_bytes()
    assert {i: (resumed / f"{i:06d}.png").stat().st_mtime_ns for i in range(4, 8)} == untouched
    assert sorted(p.name for p in resumed.iterdir()) == [f"{i:06d}.png" for i in range(N)]

    result = run_script(*argv(ckpt, sample_dir, tiny_vae_dir))  # a finished run: nothing to generate
    assert "3 already done, 0 to generate" in result.stdout
    assert the_npz(sample_dir)[0].read_bytes() == npz.read_bytes()


def test_bare_state_dict_gives_the_samples_of_the_training_checkpoint(base_run, ckpt, tiny_vae_dir, tmp_path):
    trained = load_checkpoint(ckpt)  # weights_only, with the released checkpoints' argparse.Namespace
    assert isinstance(trained["args"], argparse.Namespace)
    bare = tmp_path / "step-100.pt"  # same stem, so the same folder name
    torch.save(trained["ema"], bare)
    npz, _ = run_generate(bare, tmp_path / "samples", tiny_vae_dir)
    assert npz.read_bytes() == base_run[0].read_bytes()


# ---------------------------------------------------------------------------------------------- errors

class Untrusted:
    """Any class outside torch's weights_only allowlist: unpickling it could run code."""


def small_checkpoint(**extra):
    return {"ema": {"w": torch.zeros(3)}, **extra}


def error_case(name, tmp_path, ckpt, monkeypatch):
    """(checkpoint path, extra flags, sample dir, words the message must hold) of one error case."""
    path, sample_dir = tmp_path / "bad.pt", tmp_path / "samples"
    if name == "missing":
        return path, [], sample_dir, ["--ckpt", "no such file"]
    if name == "truncated":
        torch.save(small_checkpoint(args=argparse.Namespace(model="SiT-S/2")), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, [], sample_dir, ["--ckpt", "truncated or corrupt"]
    if name == "untrusted":
        torch.save(small_checkpoint(extra=Untrusted()), path)
        return path, [], sample_dir, ["--ckpt", "refused", "Untrusted"]
    if name == "other-classes":
        torch.save(training_checkpoint(tiny_state_dict(num_classes=20), num_classes=20), path)
        return path, [], sample_dir, ["y_embedder.embedding_table.weight (21, 384) vs (11, 384)", "--num-classes 20"]
    if name == "no-null-class":
        state_dict = tiny_state_dict()
        state_dict["y_embedder.embedding_table.weight"] = state_dict["y_embedder.embedding_table.weight"][:CLASSES]
        torch.save(state_dict, path)
        return path, [], sample_dir, ["no null class", "--cfg-scale 1"]
    if name == "partial-head":  # a head is filled in only where the checkpoint has none at all
        torch.save({k: v for k, v in tiny_state_dict().items() if k != "ap_head.linear2.weight"}, path)
        return path, [], sample_dir, ["1 missing (ap_head.linear2.weight)"]
    if name == "original-sit":  # like SiT's SiT-XL-2-256.pt: learned sigma, no ap_head, t = 1 is data
        torch.manual_seed(0)
        original = SiT_models["SiT-S/2"](input_size=RES // 8, num_classes=CLASSES, learn_sigma=True)
        torch.save({k: v for k, v in original.state_dict().items() if not k.startswith("ap_head.")}, path)
        return path, [], sample_dir, ["final_layer.linear.weight (32, 384) vs (16, 384)"]
    if name == "vae":
        return ckpt, ["--vae", str(tmp_path / "no-vae")], sample_dir, ["--vae", "AutoencoderKL"]
    if name == "sample-dir":
        (tmp_path / "a-file").write_text("")
        return ckpt, [], tmp_path / "a-file" / "samples", ["--sample-dir", "not writable"]
    if name == "world-size":  # torchrun's variables without its rendezvous: must fail at once, not wait for peers
        for var, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
            monkeypatch.setenv(var, value)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(var, raising=False)
        return ckpt, [], sample_dir, ["WORLD_SIZE=2", "torchrun"]
    raise ValueError(name)


def assert_nothing_written(tmp_path):
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.npz"))


@pytest.mark.parametrize("name", ["missing", "truncated", "untrusted", "other-classes", "no-null-class",
                                  "partial-head", "original-sit", "vae", "sample-dir", "world-size"])
def test_errors_are_one_line_before_any_sampling(name, ckpt, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    """In-process through run_main, as the script runs it (a subprocess per case would mostly time imports)."""
    path, flags, sample_dir, words = error_case(name, tmp_path, ckpt, monkeypatch)
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: generate.main(generate.parse_args(argv(path, sample_dir, tiny_vae_dir, *flags)[1:])))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not sample_dir.exists()
    assert_nothing_written(tmp_path)


def test_another_architecture_exits_2_with_one_line_and_no_sample_folder(tiny_vae_dir, tmp_path):
    path = tmp_path / "sit-s-4.pt"
    torch.save(training_checkpoint(tiny_state_dict("SiT-S/4"), "SiT-S/4"), path)
    result = run_script(*argv(path, tmp_path / "samples", tiny_vae_dir), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("error:"):]
    for word in (str(path), "another architecture than --model SiT-S/2", "shapes differ",
                 "trained with --model SiT-S/4"):
        assert word in message, message
    assert not (tmp_path / "samples").exists()
    assert_nothing_written(tmp_path)


def test_killed_midway_and_rerun_gives_the_npz_of_an_uninterrupted_run(ckpt, tiny_vae_dir, tmp_path):
    longer = ["--num-fid-samples", "12", "--per-proc-batch-size", "2", "--num-steps", "20"]
    full_npz, _ = run_generate(ckpt, tmp_path / "full", tiny_vae_dir, *longer)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *argv(ckpt, killed, tiny_vae_dir, *longer)], cwd=Path(generate.__file__).parent,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(killed.glob("*/*.png"))) < 4:
        assert proc.poll() is None and time.time() < deadline, "generation ended before it could be interrupted"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not list(killed.glob("*.npz")), "the npz must not exist before all samples do"
    assert len(list(killed.glob("*/*.png"))) < 12
    npz, _ = run_generate(ckpt, killed, tiny_vae_dir, *longer)
    assert npz.read_bytes() == full_npz.read_bytes()
