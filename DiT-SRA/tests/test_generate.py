"""End-to-end tests of generate.py on CPU: a tiny DiT-T/2 at 32 px (latent 4x4), a random local VAE, 10 samples,
5 respaced DDPM steps.

Sampling runs are subprocesses, as a user launches them (python, or torchrun with 2 gloo processes); the error cases
run in-process through utils.run_main (one subprocess, another architecture, checks the real exit status).
The model-independent helpers (seeds, PNGs, the .npz writer) are tested in test_sampling_io.py.
"""
import argparse
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

import generate
from diffusion import create_diffusion
from models import DiT_models
from sampling_io import RowGenerators, fill_unset_flags
from utils import UserError, load_checkpoint, run_main

RES, N, BATCH, CLASSES, MODEL = 32, 10, 4, 10, "DiT-T/2"


def tiny_model(model_name=MODEL, num_classes=CLASSES, seed=0):
    """A DiT whose zero-initialised adaLN and output layers are perturbed, so samples are not trivial."""
    torch.manual_seed(seed)
    model = DiT_models[model_name](input_size=RES // 8, num_classes=num_classes, class_dropout_prob=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def training_checkpoint(state_dict, model_name=MODEL, num_classes=CLASSES):
    """The dict train.py writes; `model` and `ema` share tensors, so torch.save stores them once."""
    args = argparse.Namespace(model=model_name, resolution=RES, num_classes=num_classes, cfg_prob=0.1)
    return {"model": state_dict, "ema": state_dict, "opt": {}, "args": args, "epoch": 3, "steps": 100}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step-100.pt"
    torch.save(training_checkpoint(tiny_model().state_dict()), path)
    return path


def argv(ckpt, sample_dir, vae_dir, *extra):
    """generate.py's command line for the tiny setting: DDPM, 5 steps, no guidance (gen.sh's CFG 1.0)."""
    return ["generate.py", "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), "--model", MODEL,
            "--num-classes", str(CLASSES), "--resolution", str(RES), "--vae", str(vae_dir),
            "--per-proc-batch-size", str(BATCH), "--num-fid-samples", str(N), "--num-sampling-steps", "5",
            "--cfg-scale", "1.0", *extra]


def the_npz(sample_dir):
    """The one .npz of a sample dir (asserting there is exactly one) and the folder of its PNGs."""
    npzs = sorted(sample_dir.glob("*.npz"))
    assert len(npzs) == 1, npzs
    return npzs[0], npzs[0].with_suffix("")


def run_generate(ckpt, sample_dir, vae_dir, *extra):
    run_script(*argv(ckpt, sample_dir, vae_dir, *extra))
    return the_npz(sample_dir)


def images(npz):
    return np.load(npz)["arr_0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process torch on one thread, like the scripts' subprocesses (OMP_NUM_THREADS=1): on tiny tensors a second
    thread only adds waiting, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    generate.check_flags(parse_for_bare_state_dict(base + ["--sampler", "ddim", "--num-steps", "50"]))
    for flag, bad in (("--num-sampling-steps", ["--num-sampling-steps", "0"]),
                      ("--num-sampling-steps", ["--num-sampling-steps", "1001"]),
                      ("--num-sampling-steps", ["--sampler", "ddim", "--num-steps", "600"]),  # no stride gives 600
                      ("--global-seed", ["--global-seed", "-1"]), ("--resolution", ["--image-size", "30"])):
        with pytest.raises(UserError, match=flag):
            generate.check_flags(parse_for_bare_state_dict(base + bad))


def test_direct_call_defaults_are_the_released_generate_py():
    args = parse_for_bare_state_dict(["--ckpt", "x.pt"])
    assert (args.model, args.resolution, args.num_classes, args.sampler, args.num_sampling_steps, args.cfg_scale,
            args.per_proc_batch_size, args.num_fid_samples, args.vae, args.global_seed, args.tf32) == (
        "DiT-XL/2", 256, 1000, "ddpm", 250, 1.5, 32, 50_000, "ema", 0, True)
    assert generate.parse_args(["--ckpt", "x.pt", "--local-rank=3"]).local_rank == 3  # torch.distributed.launch
    assert generate.parse_args(["--ckpt", "x.pt", "--local_rank", "3"]).local_rank == 3


def test_unset_model_flags_come_from_the_checkpoint_and_a_given_flag_wins(ckpt, tmp_path):
    args = generate.parse_args(["--ckpt", str(ckpt)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS)
    assert (args.model, args.resolution, args.num_classes) == (MODEL, RES, CLASSES)
    args = generate.parse_args(["--ckpt", str(ckpt), "--model", "DiT-B/4", "--image-size", "64"])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS)
    assert (args.model, args.resolution, args.num_classes) == ("DiT-B/4", 64, CLASSES)
    path = tmp_path / "unknown.pt"
    torch.save(training_checkpoint(tiny_model().state_dict(), model_name="DiT-Q/2"), path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS)
    with pytest.raises(UserError, match="trained with --model DiT-Q/2"):
        generate.check_flags(args)


def test_a_run_without_model_flags_samples_as_the_checkpoints_args_say(base_run, ckpt, tiny_vae_dir, tmp_path):
    flags = argv(ckpt, tmp_path, tiny_vae_dir)
    for flag in ("--model", "--num-classes", "--resolution"):
        del flags[flags.index(flag):flags.index(flag) + 2]
    run_script(*flags)
    npz, _ = the_npz(tmp_path)
    assert npz.name == base_run[0].name and npz.read_bytes() == base_run[0].read_bytes()


def manual_guidance(model):
    """forward_with_cfg written out for x (2n, ...) and y = [y; null], from two separate calls of n rows: both halves
    get uncond + cfg_scale * (cond - uncond) on the first 3 channels and the conditional output's other channels."""
    def call(x, t, y, cfg_scale):
        n = len(x) // 2
        cond, uncond = model(x[:n], t[:n], y[:n]), model(x[:n], t[:n], y[n:])
        first = uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3])
        half = torch.cat([first, cond[:, 3:]], dim=1)
        return torch.cat([half, half])
    return call


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_guided_half_is_forward_with_cfg_guidance_of_the_samples_own_noise(scale):
    """guided_loop's kept half equals a run guided by hand with the same per-sample noise; at scale 1 it also equals
    the unguided plain_loop. Tolerance 1e-5 of the samples' largest value (measured: below 1e-6): the batched (2n
    rows) and unbatched model calls and uncond + (cond - uncond) round differently in float32."""
    model, diffusion = tiny_model(), create_diffusion("5")
    seeds = range(3)

    def noise():
        """Fresh per-sample generators: (latents (3, 4, h, w), labels (3,), the generators for the step noise)."""
        rows = RowGenerators(seeds, torch.device("cpu"))
        return rows.randn((4, RES // 8, RES // 8)), rows.randint(CLASSES), rows

    latents, labels, rows = noise()
    guided = generate.guided_loop(diffusion.p_sample_loop, model.forward_with_cfg, latents, labels, CLASSES, scale,
                                  rows.randn_like)
    latents, labels, rows = noise()
    by_hand = generate.guided_loop(diffusion.p_sample_loop, manual_guidance(model), latents, labels, CLASSES,
                                   scale, rows.randn_like)
    assert guided.shape == latents.shape
    tolerance = 1e-5 * by_hand.abs().max().item()
    torch.testing.assert_close(guided, by_hand, rtol=0, atol=tolerance)
    latents, labels, rows = noise()
    plain = generate.plain_loop(diffusion.p_sample_loop, model, latents, labels, rows.randn_like)
    if scale == 1.0:
        torch.testing.assert_close(guided, plain, rtol=0, atol=tolerance)
    else:
        assert not torch.allclose(guided, plain)


def test_gen_sh_passes_the_released_settings(tmp_path):
    """gen.sh with a stand-in torchrun that records its arguments; generate.py must accept them."""
    (tmp_path / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    (tmp_path / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "ARGS_FILE": str(tmp_path / "args"),
           "CKPT": "my.pt", "NUM_GPUS": "4"}
    subprocess.run(["bash", "gen.sh"], cwd=Path(generate.__file__).parent, env=env, check=True)
    recorded = (tmp_path / "args").read_text().splitlines()
    assert recorded[:3] == ["--nnodes=1", "--nproc_per_node=4", "generate.py"]
    args = generate.parse_args(recorded[3:])
    generate.check_flags(args)
    assert (args.ckpt, args.model, args.resolution, args.vae, args.per_proc_batch_size, args.num_fid_samples,
            args.sampler, args.num_sampling_steps, args.cfg_scale, args.global_seed, args.num_classes) == (
        "my.pt", "DiT-XL/2", 256, "ema", 64, 50_000, "ddpm", 250, 1.0, 0, 1000)


# ---------------------------------------------------------------------------------------------- end to end

def test_writes_pngs_and_one_npz_in_index_order(base_run):
    npz, folder = base_run
    assert folder.name == "DiT-T-2-step-100-size-32-vae-vae0-cfg-1.0-seed-0-ddpm-steps-5-fp32-classes-10"
    arr = images(npz)
    assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(N)]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in pngs]  # no temporary files left
    for i, path in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(path)), arr[i])
    assert len({arr[i].tobytes() for i in range(N)}) == N  # the samples are not trivial copies of each other


def test_same_seed_is_byte_identical_and_another_seed_differs(base_run, ckpt, tiny_vae_dir, tmp_path):
    """The rerun loads a bare state dict of the checkpoint's EMA weights, which must give the same samples."""
    trained = load_checkpoint(ckpt)  # weights_only, with the released checkpoints' argparse.Namespace
    assert isinstance(trained["args"], argparse.Namespace)
    bare = tmp_path / "step-100.pt"  # same stem, so the same folder name
    torch.save(trained["ema"], bare)
    again, _ = run_generate(bare, tmp_path / "again", tiny_vae_dir)
    assert again.read_bytes() == base_run[0].read_bytes()
    other, _ = run_generate(ckpt, tmp_path / "other", tiny_vae_dir, "--global-seed", "1")
    assert "seed-1" in other.name
    assert not np.array_equal(images(other), images(base_run[0]))


def test_two_processes_give_the_npz_of_one(base_run, ckpt, tiny_vae_dir, tmp_path):
    run_script("torchrun", "--standalone", "--nproc_per_node", "2", *argv(ckpt, tmp_path, tiny_vae_dir))
    npz, _ = the_npz(tmp_path)
    assert npz.read_bytes() == base_run[0].read_bytes()


def test_samples_depend_on_their_index_not_on_the_batch_size(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, _ = run_generate(ckpt, tmp_path, tiny_vae_dir, "--per-proc-batch-size", "3")
    # Same noise, labels and step noise per index; only the float rounding of batched matmuls may differ.
    diff = np.abs(images(npz).astype(int) - images(base_run[0]).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_guidance_ddim_and_bf16_change_the_samples(base_run, ckpt, tiny_vae_dir, tmp_path):
    runs = {"cfg": ["--cfg-scale", "4.0"], "ddim": ["--sampler", "ddim", "--precision", "bf16"]}
    for name, flags in runs.items():
        npz, folder = run_generate(ckpt, tmp_path / name, tiny_vae_dir, *flags)
        arr = images(npz)
        assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8 and len(list(folder.glob("*.png"))) == N
        assert not np.array_equal(arr, images(base_run[0])), name
    assert "-cfg-4.0-seed-0-ddpm-steps-5-fp32-" in the_npz(tmp_path / "cfg")[1].name
    assert "-cfg-1.0-seed-0-ddim-steps-5-bf16-" in the_npz(tmp_path / "ddim")[1].name


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

    again.write_bytes(again.read_bytes()[:1000])  # a damaged npz of a finished run: written again from the PNGs
    result = run_script(*argv(ckpt, sample_dir, tiny_vae_dir))
    assert "3 already done, 0 to generate" in result.stdout
    assert the_npz(sample_dir)[0].read_bytes() == npz.read_bytes()


def test_original_dit_checkpoint_without_the_sra_head_samples_like_the_same_weights_with_it(base_run, tiny_vae_dir,
                                                                                          tmp_path):
    """Like facebookresearch's DiT-XL-2-256x256.pt: a bare state dict, learned sigma, no ap_head. Sampling never runs
    the head, so these weights give the samples of the training checkpoint that has one."""
    original = tmp_path / "step-100.pt"  # the training checkpoint's stem, so the same sample folder name
    torch.save({k: v for k, v in tiny_model().state_dict().items() if not k.startswith("ap_head.")}, original)
    npz, _ = run_generate(original, tmp_path / "samples", tiny_vae_dir)
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
        torch.save(small_checkpoint(args=argparse.Namespace(model=MODEL)), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, [], sample_dir, ["--ckpt", "truncated or corrupt"]
    if name == "untrusted":
        torch.save(small_checkpoint(extra=Untrusted()), path)
        return path, [], sample_dir, ["--ckpt", "refused", "Untrusted"]
    if name == "other-classes":
        torch.save(training_checkpoint(tiny_model(num_classes=20).state_dict(), num_classes=20), path)
        return path, [], sample_dir, ["y_embedder.embedding_table.weight (21, 192) vs (11, 192)", "--num-classes 20"]
    if name == "no-null-class":
        state_dict = tiny_model().state_dict()
        state_dict["y_embedder.embedding_table.weight"] = state_dict["y_embedder.embedding_table.weight"][:CLASSES]
        torch.save(state_dict, path)
        return path, ["--cfg-scale", "1.5"], sample_dir, ["no null class", "--cfg-scale 1"]
    if name == "partial-head":  # a head is filled in only where the checkpoint has none at all
        torch.save({k: v for k, v in tiny_model().state_dict().items() if k != "ap_head.linear2.weight"}, path)
        return path, [], sample_dir, ["1 missing (ap_head.linear2.weight)"]
    if name == "steps":
        return ckpt, ["--sampler", "ddim", "--num-sampling-steps", "600"], sample_dir, ["--num-sampling-steps 600"]
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
                                  "partial-head", "steps", "vae", "sample-dir", "world-size"])
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
    path = tmp_path / "dit-t-1.pt"
    torch.save(training_checkpoint(tiny_model("DiT-T/1").state_dict(), "DiT-T/1"), path)
    result = run_script(*argv(path, tmp_path / "samples", tiny_vae_dir), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("error:"):]
    for word in (str(path), f"another architecture than --model {MODEL}", "shapes differ",
                 "trained with --model DiT-T/1"):
        assert word in message, message
    assert not (tmp_path / "samples").exists()
    assert_nothing_written(tmp_path)
