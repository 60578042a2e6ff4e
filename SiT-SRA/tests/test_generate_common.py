"""End-to-end tests of generate.py that hold for both families, on CPU with conftest's tiny setting (SiT-S/2 or
DiT-T/2 at 32 px, a random local VAE, 10 samples): the files written, determinism, processes, resume, errors.

Sampling runs are subprocesses, as a user launches them (python, or torchrun with 2 gloo processes); the error cases
run in-process through utils.run_main (one subprocess, another architecture, checks the real exit status).
Each tree's test_generate.py tests its own flags, sampler and gen.sh; test_sampling_io.py the model-independent
helpers (seeds, PNGs, the .npz writer).
"""
import argparse
import shutil

import numpy as np
import pytest
import torch
from conftest import (CLASSES, FAMILY, MODELS, N, RES, SAMPLE_MODEL, generate_argv, offline_hub_env, run_generate,
                      run_script, sampling_model, serve_from_offline_hub, the_npz, training_checkpoint)
from PIL import Image

import generate
import sampling_io
from utils import RELEASED_REPO, load_checkpoint, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

BASE_FOLDER = {"SiT": "SiT-S-2-step-100-size-32-vae-vae0-cfg-4.0-seed-0-sde-steps-5-interval-0.2-0.7-linear-fp32"
                      "-classes-10",
               "DiT": "DiT-T-2-step-100-size-32-vae-vae0-cfg-1.0-seed-0-ddpm-steps-5-fp32-classes-10"}[FAMILY]
WIDTH = {"SiT": 384, "DiT": 192}[FAMILY]  # the hidden size of SAMPLE_MODEL
OTHER_ARCHITECTURE = {"SiT": "SiT-S/4", "DiT": "DiT-T/1"}[FAMILY]  # same width and depth, another patch size


def images(npz):
    return np.load(npz)["arr_0"]


# ---------------------------------------------------------------------------------------------- end to end

def test_a_run_without_model_flags_samples_as_the_checkpoints_args_say(base_run, ckpt, tiny_vae_dir, tmp_path):
    flags = generate_argv(ckpt, tmp_path, tiny_vae_dir)
    for flag in ("--model", "--num-classes", "--resolution"):
        del flags[flags.index(flag):flags.index(flag) + 2]
    run_script(*flags)
    npz, _ = the_npz(tmp_path)
    assert npz.name == base_run[0].name and npz.read_bytes() == base_run[0].read_bytes()


@pytest.mark.parametrize("saved_as", ["Namespace", "dict"])
def test_the_whole_model_config_comes_from_the_checkpoint_args(tmp_path, saved_as):
    """--model, --resolution, --num-classes and --qk-norm unset: a checkpoint trained with --qk-norm, its args an
    argparse.Namespace (train.py, the released train.py) or a dict, builds its model and loads strictly."""
    torch.manual_seed(0)
    trained = MODELS[SAMPLE_MODEL](input_size=RES // 8, num_classes=CLASSES, class_dropout_prob=0.1, qk_norm=True)
    checkpoint = training_checkpoint(trained.state_dict())
    checkpoint["args"].qk_norm = True
    if saved_as == "dict":
        checkpoint["args"] = vars(checkpoint["args"])
    path = tmp_path / "qk.pt"
    torch.save(checkpoint, path)
    args = generate.parse_args(["--ckpt", str(path)])
    weights = generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, MODELS)
    assert (args.model, args.resolution, args.num_classes, args.qk_norm) == (SAMPLE_MODEL, RES, CLASSES, True)
    assert f"trained with --model {SAMPLE_MODEL}" in weights.trained_with
    generate.check_flags(args)
    model = sampling_io.build_model(args, MODELS, torch.device("cpu"), weights)
    assert model.blocks[0].attn.q_norm.weight.shape == (WIDTH // model.blocks[0].attn.num_heads,)


def test_the_released_scripts_launch_flags_change_nothing(base_run, ckpt, tiny_vae_dir, tmp_path, capsys):
    """--world_size and --dist_url (and --no-heun, which both released generate.py have) are accepted as released,
    say in --help that they do nothing, and give the base run's samples in the base run's folder."""
    npz, _ = run_generate(ckpt, tmp_path, tiny_vae_dir, "--world_size", "3", "--dist_url", "tcp://nowhere:1",
                          "--no-heun")
    assert npz.name == base_run[0].name and npz.read_bytes() == base_run[0].read_bytes()
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    for flag in ("--world_size WORLD_SIZE", "--dist_url DIST_URL"):
        assert f"{flag} accepted as the released generate.py does, without effect" in usage


def test_writes_pngs_and_one_npz_in_index_order(base_run):
    npz, folder = base_run
    assert folder.name == BASE_FOLDER
    arr = images(npz)
    assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(N)]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in pngs]  # no temporary files left
    for i, path in enumerate(pngs):
        assert np.array_equal(np.asarray(Image.open(path)), arr[i])
    assert len({arr[i].tobytes() for i in range(N)}) == N  # the samples are not trivial copies of each other


def test_same_seed_is_byte_identical_and_another_seed_differs(base_run, ckpt, tiny_vae_dir, tmp_path):
    again, _ = run_generate(ckpt, tmp_path / "again", tiny_vae_dir)
    assert again.read_bytes() == base_run[0].read_bytes()
    other, _ = run_generate(ckpt, tmp_path / "other", tiny_vae_dir, "--global-seed", "1")
    assert "seed-1" in other.name
    assert not np.array_equal(images(other), images(base_run[0]))


def test_bare_state_dict_gives_the_samples_of_the_training_checkpoint(base_run, ckpt, tiny_vae_dir, tmp_path):
    trained = load_checkpoint(ckpt)  # weights_only, with the released checkpoints' argparse.Namespace
    assert isinstance(trained["args"], argparse.Namespace)
    bare = tmp_path / "step-100.pt"  # same stem, so the same folder name
    torch.save(trained["ema"], bare)
    npz, _ = run_generate(bare, tmp_path / "samples", tiny_vae_dir)
    assert npz.read_bytes() == base_run[0].read_bytes()


@pytest.mark.skipif(FAMILY == "DiT", reason="the released checkpoints are SiT models, which DiT-SRA refuses before "
                                            "their download (error case released-sit)")
def test_a_released_name_samples_the_checkpoint_the_hub_cache_holds_under_it(base_run, ckpt, tiny_vae_dir, tmp_path):
    """--ckpt sitxl-sra-res256-ep800.pt, no such file: the checkpoint a private offline hub cache serves under that
    name gives the samples of the same file passed by path, byte for byte; its args (not the name's SiT-XL/2 at
    256 px) set the model, the resolution and the classes."""
    name = "sitxl-sra-res256-ep800.pt"
    env = serve_from_offline_hub(tmp_path / "hub", RELEASED_REPO, name, ckpt)
    flags = generate_argv(name, tmp_path / "samples", tiny_vae_dir)
    for flag in ("--model", "--num-classes", "--resolution"):
        del flags[flags.index(flag):flags.index(flag) + 2]
    run_script(*flags, env=env)
    npz, _ = the_npz(tmp_path / "samples")
    assert npz.name == base_run[0].name.replace("step-100", "sitxl-sra-res256-ep800")
    assert npz.read_bytes() == base_run[0].read_bytes()


@pytest.mark.skipif(FAMILY == "DiT", reason="the released checkpoints are SiT models, which DiT-SRA refuses before "
                                            "their download (error case released-sit)")
def test_a_released_name_offline_and_not_in_the_cache_is_one_line_with_the_url(tiny_vae_dir, tmp_path):
    """An empty private cache, offline (HF_HUB_OFFLINE=1); pca-vis's tests also run it with the hub unreachable."""
    result = run_script(*generate_argv("sitxl-sra-res512-ep400.pt", tmp_path / "samples", tiny_vae_dir),
                        env=offline_hub_env(tmp_path / "hub"), check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --ckpt sitxl-sra-res512-ep400.pt: cannot download "
                                    "https://huggingface.co/DyJiang/SRA/resolve/main/sitxl-sra-res512-ep400.pt (")
    assert result.stderr.endswith("; download it by hand and pass --ckpt PATH\n")
    assert not (tmp_path / "samples").exists()


def test_a_bare_state_dict_under_a_released_name_takes_the_names_settings(tmp_path):
    """A released file downloaded by hand, if it held no args: SiT-XL/2, 512 px, 1000 classes (a flag still wins)."""
    path = tmp_path / "sitxl-sra-res512-ep400.pt"
    torch.save(sampling_model().state_dict(), path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, MODELS)
    assert (args.model, args.resolution, args.num_classes) == ("SiT-XL/2", 512, 1000)
    args = generate.parse_args(["--ckpt", str(path), "--resolution", "256"])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, MODELS)
    assert args.resolution == 256


def test_two_processes_give_the_npz_of_one(base_run, ckpt, tiny_vae_dir, tmp_path):
    run_script("torchrun", "--standalone", "--nproc_per_node", "2", *generate_argv(ckpt, tmp_path, tiny_vae_dir))
    npz, _ = the_npz(tmp_path)
    assert npz.read_bytes() == base_run[0].read_bytes()


def test_samples_depend_on_their_index_not_on_the_batch_size(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, _ = run_generate(ckpt, tmp_path, tiny_vae_dir, "--per-proc-batch-size", "3")
    # Same noise, labels and step noise per index; only the float rounding of batched matmuls may differ.
    diff = np.abs(images(npz).astype(int) - images(base_run[0]).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


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

    result = run_script(*generate_argv(ckpt, sample_dir, tiny_vae_dir))
    assert "1 already done, 2 to generate" in result.stdout
    again, _ = the_npz(sample_dir)
    assert again.read_bytes() == npz.read_bytes()
    assert {i: (resumed / f"{i:06d}.png").stat().st_mtime_ns for i in range(4, 8)} == untouched
    assert sorted(p.name for p in resumed.iterdir()) == [f"{i:06d}.png" for i in range(N)]

    again.write_bytes(again.read_bytes()[:1000])  # a damaged npz of a finished run: written again from the PNGs
    result = run_script(*generate_argv(ckpt, sample_dir, tiny_vae_dir))  # a finished run: nothing to generate
    assert "3 already done, 0 to generate" in result.stdout
    assert the_npz(sample_dir)[0].read_bytes() == npz.read_bytes()


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
        torch.save(small_checkpoint(args=argparse.Namespace(model=SAMPLE_MODEL)), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, [], sample_dir, ["--ckpt", "truncated or corrupt"]
    if name == "untrusted":
        torch.save(small_checkpoint(extra=Untrusted()), path)
        return path, [], sample_dir, ["--ckpt", "refused", "Untrusted"]
    if name == "other-classes":
        torch.save(training_checkpoint(sampling_model(num_classes=20).state_dict(), num_classes=20), path)
        return path, [], sample_dir, [f"y_embedder.embedding_table.weight (21, {WIDTH}) vs (11, {WIDTH})",
                                      "--num-classes 20"]
    if name == "no-null-class":
        state_dict = sampling_model().state_dict()
        state_dict["y_embedder.embedding_table.weight"] = state_dict["y_embedder.embedding_table.weight"][:CLASSES]
        torch.save(state_dict, path)
        return path, ["--cfg-scale", "1.5"], sample_dir, ["no null class", "--cfg-scale 1"]
    if name == "partial-head":  # a head is filled in only where the checkpoint has none at all
        torch.save({k: v for k, v in sampling_model().state_dict().items() if k != "ap_head.linear2.weight"}, path)
        return path, [], sample_dir, ["1 missing (ap_head.linear2.weight)"]
    if name == "original-sit":  # like SiT's SiT-XL-2-256.pt: learned sigma, no ap_head, t = 1 is data
        torch.manual_seed(0)
        original = MODELS[SAMPLE_MODEL](input_size=RES // 8, num_classes=CLASSES, learn_sigma=True)
        torch.save({k: v for k, v in original.state_dict().items() if not k.startswith("ap_head.")}, path)
        return path, [], sample_dir, [f"--ckpt {path} is an original SiT checkpoint (learned sigma, t = 1 is data)",
                                      "sample_ddp.py", "pca-vis/main_pca.py --baseline"]
    if name == "released-sit":  # refused before its download (which, offline here, would fail with another message)
        return "sitxl-sra-res256-ep800.pt", [], sample_dir, [
            "--ckpt sitxl-sra-res256-ep800.pt is the released SiT-XL/2 checkpoint", "use SiT-SRA/generate.py"]
    if name == "steps":  # DDIM's even strides give no 600 of the 1000 steps
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


FAMILY_ERRORS = {"SiT": ["original-sit"], "DiT": ["steps", "released-sit"]}[FAMILY]  # one family's flags or checkpoints


@pytest.mark.parametrize("name", ["missing", "truncated", "untrusted", "other-classes", "no-null-class",
                                  "partial-head", *FAMILY_ERRORS, "vae", "sample-dir", "world-size"])
def test_errors_are_one_line_before_any_sampling(name, ckpt, tiny_vae_dir, tmp_path, monkeypatch, capsys):
    """In-process through run_main, as the script runs it (a subprocess per case would mostly time imports)."""
    path, flags, sample_dir, words = error_case(name, tmp_path, ckpt, monkeypatch)
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: generate.main(generate.parse_args(generate_argv(path, sample_dir, tiny_vae_dir, *flags)[1:])))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not sample_dir.exists()
    assert_nothing_written(tmp_path)


def test_a_checkpoint_of_the_other_family_names_the_generate_py_that_samples_it(tmp_path, capsys):
    other = {"SiT": "DiT", "DiT": "SiT"}[FAMILY]
    path = tmp_path / "other.pt"
    torch.save(training_checkpoint({"w": torch.zeros(1)}, model_name=f"{other}-XL/2"), path)
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: generate.main(generate.parse_args(["--ckpt", str(path), "--sample-dir", str(tmp_path / "s")])))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"was trained with --model {other}-XL/2" in err and err.endswith(f"sample it with {other}-SRA/generate.py\n")
    assert not (tmp_path / "s").exists()


def test_another_architecture_exits_2_with_one_line_and_no_sample_folder(tiny_vae_dir, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(training_checkpoint(sampling_model(OTHER_ARCHITECTURE).state_dict(), OTHER_ARCHITECTURE), path)
    result = run_script(*generate_argv(path, tmp_path / "samples", tiny_vae_dir), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("error:"):]
    for word in (str(path), f"another architecture than --model {SAMPLE_MODEL}", "shapes differ",
                 f"trained with --model {OTHER_ARCHITECTURE}"):
        assert word in message, message
    assert not (tmp_path / "samples").exists()
    assert_nothing_written(tmp_path)
