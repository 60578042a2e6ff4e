"""Tests of SiT's generate.py: its flags and defaults, gen.sh, the SDE/ODE samplers with Heun, the guidance interval,
class-balanced labels and a run killed midway. The tiny setting (SiT-S/2 at 32 px, a random local VAE, 10 samples)
and the base run are conftest's; what both families share is tested in test_generate_common.py.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (CLASSES, N, RES, SAMPLER_FLAGS, TINY_MODEL, gen_sh_arguments, generate_argv, run_generate,
                      sampling_model, training_checkpoint)

import generate
from sampling_io import autocast_call, compile_call, fill_unset_flags
from utils import UserError


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
            args.global_seed, args.tf32, args.qk_norm, args.heun) == (
        "SiT-B/2", 256, 1000, "linear", "sde", 50, 1.8, 0.0, 1.0, 32, 50_000, "ema", 0, True, False, False)
    assert args.fused_attn  # ours; the released SiT generate.py defaulted to --no-fused-attn
    assert generate.parse_args(["--ckpt", "x.pt", "--local-rank=3"]).local_rank == 3  # torch.distributed.launch
    assert generate.parse_args(["--ckpt", "x.pt", "--local_rank", "3"]).local_rank == 3


def test_unset_model_flags_come_from_the_checkpoint_and_a_given_flag_wins(tmp_path):
    path = tmp_path / "cosine.pt"
    checkpoint = training_checkpoint(sampling_model().state_dict())
    checkpoint["args"].path_type = "cosine"
    torch.save(checkpoint, path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.SiT_models)
    assert (args.model, args.resolution, args.num_classes, args.path_type) == ("SiT-S/2", RES, CLASSES, "cosine")
    args = generate.parse_args(["--ckpt", str(path), "--model", "SiT-B/4", "--resolution", "64", "--path-type", "linear"])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.SiT_models)
    assert (args.model, args.resolution, args.num_classes, args.path_type) == ("SiT-B/4", 64, CLASSES, "linear")
    checkpoint["args"].model = "SiT-Q/2"
    torch.save(checkpoint, path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.SiT_models)
    with pytest.raises(UserError, match="trained with --model SiT-Q/2 --path-type cosine"):
        generate.check_flags(args)


@pytest.mark.parametrize("resolution, cfg, released", [("256", 1.8, "sitxl-sra-res256-ep800.pt"),
                                                       ("512", 2.5, "sitxl-sra-res512-ep400.pt")])
def test_gen_sh_passes_the_released_settings(resolution, cfg, released, tmp_path):
    """gen.sh with a stand-in torchrun that records its arguments; generate.py must accept them. Without CKPT it
    samples the released checkpoint of the resolution, by name."""
    args = generate.parse_args(gen_sh_arguments(tmp_path, RESOLUTION=resolution, CKPT="my.pt"))
    generate.check_flags(args)
    assert (args.ckpt, args.model, args.resolution, args.vae, args.per_proc_batch_size, args.num_fid_samples,
            args.mode, args.num_steps, args.cfg_scale, args.guidance_low, args.guidance_high, args.global_seed) == (
        "my.pt", "SiT-XL/2", int(resolution), "ema", 64, 50_000, "sde", 250, cfg, 0.0, 0.7, 0)
    assert generate.parse_args(gen_sh_arguments(tmp_path, RESOLUTION=resolution)).ckpt == released


@pytest.mark.parametrize("name, cfg", [("sitxl-sra-res256-ep800.pt", 1.8), ("sitxl-sra-res512-ep400.pt", 2.5)])
def test_a_released_checkpoint_samples_with_its_released_guidance_unless_given(name, cfg, ckpt, tmp_path):
    """Its training args hold no guidance: the name gives the released FID's, a flag wins, another file keeps the
    released generate.py's defaults (CFG 1.8 on all of [0, 1])."""
    shutil.copyfile(ckpt, tmp_path / name)
    for flags, expected in (([], (cfg, 0.0, 0.7)), (["--cfg-scale", "1.0", "--guidance-high", "1.0"], (1.0, 0.0, 1.0))):
        args = generate.parse_args(["--ckpt", str(tmp_path / name), *flags])
        generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.SiT_models)
        assert (args.cfg_scale, args.guidance_low, args.guidance_high) == expected
    args = generate.parse_args(["--ckpt", str(ckpt)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.SiT_models)
    assert (args.cfg_scale, args.guidance_low, args.guidance_high) == (1.8, 0.0, 1.0)


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


def test_ode_with_heun_guidance_interval_and_bf16(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, folder = run_generate(ckpt, tmp_path, tiny_vae_dir, "--mode", "ode", "--heun", "--cfg-scale", "3.0",
                               "--guidance-low", "0.3", "--guidance-high", "0.8", "--precision", "bf16")
    assert "-ode-steps-5-heun-interval-0.3-0.8-" in folder.name and folder.name.endswith("bf16-classes-10")
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8 and len(list(folder.glob("*.png"))) == N
    assert not np.array_equal(arr, np.load(base_run[0])["arr_0"])


def test_killed_midway_and_rerun_gives_the_npz_of_an_uninterrupted_run(ckpt, tiny_vae_dir, tmp_path):
    longer = ["--num-fid-samples", "12", "--per-proc-batch-size", "2", "--num-steps", "20"]
    full_npz, _ = run_generate(ckpt, tmp_path / "full", tiny_vae_dir, *longer)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *generate_argv(ckpt, killed, tiny_vae_dir, *longer)],
                            cwd=Path(generate.__file__).parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
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


def test_compiled_sampler_gives_the_eager_samples_to_float_rounding(monkeypatch):
    """sample_batch with generate.py's compiled network call (inductor, as on a GPU) against the eager call, 5 SDE
    steps with CFG 4 on t in [0.2, 0.7] (both batch shapes), the same per-index seeds. Inductor fuses and reorders
    float32 reductions, so each model output moves by a few float32 ulps (~1e-7 relative) and the steps add them up,
    CFG scaling the difference by up to 2 * 4 - 1: 1e-5 on latents of unit scale bounds that (measured: 1.7e-6 on
    latents up to 3.1; 5.9e-7 for SiT-S/2 over 50 steps), while a wrong row, time or label moves samples by far more (the other indices below)."""
    monkeypatch.setattr(generate, "decode_to_uint8", lambda vae, latents: latents)  # compare the latents themselves
    model = sampling_model(TINY_MODEL)
    args = generate.parse_args(["--ckpt", "c.pt", "--model", TINY_MODEL, "--num-classes", str(CLASSES),
                                "--resolution", str(RES), "--path-type", "linear", *SAMPLER_FLAGS])
    cpu = torch.device("cpu")
    eager_fn = autocast_call(model, cpu, args.precision)
    compiled_fn = compile_call(eager_fn, cpu, True)
    eager = generate.sample_batch(args, eager_fn, None, range(4), cpu)
    compiled = generate.sample_batch(args, compiled_fn, None, range(4), cpu)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert (generate.sample_batch(args, eager_fn, None, range(4, 8), cpu) - eager).abs().max() > 0.1


def test_gen_sh_keeps_fp32_and_the_compile_default_and_passes_precision_and_compile_0(tmp_path):
    args = generate.parse_args(gen_sh_arguments(tmp_path))
    assert (args.precision, args.compile) == ("fp32", None)  # None: compiled on GPUs, as generate.py decides
    args = generate.parse_args(gen_sh_arguments(tmp_path, PRECISION="bf16", COMPILE="0"))
    assert (args.precision, args.compile) == ("bf16", False)
