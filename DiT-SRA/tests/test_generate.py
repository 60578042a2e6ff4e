"""Tests of DiT's generate.py: its flags and defaults, gen.sh, classifier-free guidance through forward_with_cfg,
DDIM, and the original DiT checkpoints. The tiny setting (DiT-T/2 at 32 px, a random local VAE, 10 samples, 5
respaced DDPM steps) and the base run are conftest's; what both families share is tested in test_generate_common.py.
"""
import numpy as np
import pytest
import torch
from conftest import (CLASSES, N, RES, SAMPLE_MODEL, TINY_MODEL, gen_sh_arguments, run_generate, sampling_model,
                      the_npz, training_checkpoint)

import generate
from diffusion import create_diffusion
from sampling_io import RowGenerators, fill_unset_flags
from utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def parse_for_bare_state_dict(argv):
    """parse_args, then the flags a checkpoint without args leaves unset filled with the released defaults."""
    return fill_unset_flags(generate.parse_args(argv), None, generate.RELEASED_DEFAULTS)


def images(npz):
    return np.load(npz)["arr_0"]


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
            args.per_proc_batch_size, args.num_fid_samples, args.vae, args.global_seed, args.tf32, args.qk_norm,
            args.heun) == ("DiT-XL/2", 256, 1000, "ddpm", 250, 1.5, 32, 50_000, "ema", 0, True, False, False)
    assert args.fused_attn  # ours; the released DiT generate.py built its model without the fused kernel
    assert generate.parse_args(["--ckpt", "x.pt", "--local-rank=3"]).local_rank == 3  # torch.distributed.launch
    assert generate.parse_args(["--ckpt", "x.pt", "--local_rank", "3"]).local_rank == 3


def test_unset_model_flags_come_from_the_checkpoint_and_a_given_flag_wins(ckpt, tmp_path):
    args = generate.parse_args(["--ckpt", str(ckpt)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.DiT_models)
    assert (args.model, args.resolution, args.num_classes) == (SAMPLE_MODEL, RES, CLASSES)
    args = generate.parse_args(["--ckpt", str(ckpt), "--model", "DiT-B/4", "--image-size", "64"])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.DiT_models)
    assert (args.model, args.resolution, args.num_classes) == ("DiT-B/4", 64, CLASSES)
    path = tmp_path / "unknown.pt"
    torch.save(training_checkpoint(sampling_model().state_dict(), model_name="DiT-Q/2"), path)
    args = generate.parse_args(["--ckpt", str(path)])
    generate.read_checkpoint(args, generate.RELEASED_DEFAULTS, generate.DiT_models)
    with pytest.raises(UserError, match="trained with --model DiT-Q/2"):
        generate.check_flags(args)


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
    model, diffusion = sampling_model(), create_diffusion("5")
    seeds = range(3)

    def noise():
        """Fresh per-sample generators: (latents (3, 4, h, w), labels (3,), the generators for the step noise)."""
        rows = RowGenerators(seeds, torch.device("cpu"))
        return rows.randn((4, RES // 8, RES // 8)), rows.randint(CLASSES), rows

    latents, labels, rows = noise()
    guided = generate.guided_loop(diffusion.p_sample_loop, model.forward_with_cfg, latents, labels, CLASSES, scale,
                                  rows.fill_normal)
    latents, labels, rows = noise()
    by_hand = generate.guided_loop(diffusion.p_sample_loop, manual_guidance(model), latents, labels, CLASSES,
                                   scale, rows.fill_normal)
    assert guided.shape == latents.shape
    tolerance = 1e-5 * by_hand.abs().max().item()
    torch.testing.assert_close(guided, by_hand, rtol=0, atol=tolerance)
    latents, labels, rows = noise()
    plain = generate.plain_loop(diffusion.p_sample_loop, model, latents, labels, rows.fill_normal)
    if scale == 1.0:
        torch.testing.assert_close(guided, plain, rtol=0, atol=tolerance)
    else:
        assert not torch.allclose(guided, plain)


def test_gen_sh_passes_the_released_settings(tmp_path):
    """gen.sh with a stand-in torchrun that records its arguments; generate.py must accept them."""
    args = generate.parse_args(gen_sh_arguments(tmp_path, CKPT="my.pt"))
    generate.check_flags(args)
    assert (args.ckpt, args.model, args.resolution, args.vae, args.per_proc_batch_size, args.num_fid_samples,
            args.sampler, args.num_sampling_steps, args.cfg_scale, args.global_seed, args.num_classes) == (
        "my.pt", "DiT-XL/2", 256, "ema", 64, 50_000, "ddpm", 250, 1.0, 0, 1000)


def test_guidance_ddim_and_bf16_change_the_samples(base_run, ckpt, tiny_vae_dir, tmp_path):
    runs = {"cfg": ["--cfg-scale", "4.0"], "ddim": ["--sampler", "ddim", "--precision", "bf16"]}
    for name, flags in runs.items():
        npz, folder = run_generate(ckpt, tmp_path / name, tiny_vae_dir, *flags)
        arr = images(npz)
        assert arr.shape == (N, RES, RES, 3) and arr.dtype == np.uint8 and len(list(folder.glob("*.png"))) == N
        assert not np.array_equal(arr, images(base_run[0])), name
    assert "-cfg-4.0-seed-0-ddpm-steps-5-fp32-" in the_npz(tmp_path / "cfg")[1].name
    assert "-cfg-1.0-seed-0-ddim-steps-5-bf16-" in the_npz(tmp_path / "ddim")[1].name


def test_original_dit_checkpoint_without_the_sra_head_samples_like_the_same_weights_with_it(base_run, tiny_vae_dir,
                                                                                          tmp_path):
    """Like facebookresearch's DiT-XL-2-256x256.pt: a bare state dict, learned sigma, no ap_head. Sampling never runs
    the head, so these weights give the samples of the training checkpoint that has one."""
    original = tmp_path / "step-100.pt"  # the training checkpoint's stem, so the same sample folder name
    torch.save({k: v for k, v in sampling_model().state_dict().items() if not k.startswith("ap_head.")}, original)
    npz, _ = run_generate(original, tmp_path / "samples", tiny_vae_dir)
    assert npz.read_bytes() == base_run[0].read_bytes()


def test_heun_is_accepted_as_released_and_changes_nothing(base_run, ckpt, tiny_vae_dir, tmp_path):
    npz, _ = run_generate(ckpt, tmp_path, tiny_vae_dir, "--heun")
    assert npz.name == base_run[0].name and npz.read_bytes() == base_run[0].read_bytes()


def test_compiled_sampler_gives_the_eager_samples_to_float_rounding(monkeypatch):
    """sample_batch with generate.py's compiled network call (inductor, as on a GPU) against the eager call, 5 DDPM
    steps with CFG 4 (forward_with_cfg), the same per-index seeds. Inductor fuses and reorders float32 reductions, so
    each model output moves by a few float32 ulps (~1e-6 absolute) and DDPM amplifies that: a step recovers x_0 as
    sqrt(1 / abar) x - sqrt(1 / abar - 1) eps, whose factor on eps is 157 at the first of 5 respaced steps (times 0.057
    into the posterior mean), 17 at the second, and CFG 4 scales eps differences by up to 2 * 4 - 1; the state is
    float32. Measured: 5.0e-4; the tolerance 2e-3 leaves 4x, while a wrong row, time or label moves samples by far more
    (the other indices below)."""
    monkeypatch.setattr(generate, "decode_to_uint8", lambda vae, latents: latents)  # compare the latents themselves
    model = sampling_model(TINY_MODEL)
    flags = ["--ckpt", "c.pt", "--model", TINY_MODEL, "--num-classes", str(CLASSES), "--resolution", str(RES),
             "--num-sampling-steps", "5", "--cfg-scale", "4.0"]
    eager_args, compiled_args = generate.parse_args([*flags, "--no-compile"]), generate.parse_args([*flags, "--compile"])
    cpu, diffusion = torch.device("cpu"), create_diffusion("5")
    eager_fn = generate.model_call(eager_args, model, cpu)
    eager = generate.sample_batch(eager_args, diffusion, eager_fn, None, range(4), cpu)
    compiled = generate.sample_batch(compiled_args, diffusion, generate.model_call(compiled_args, model, cpu), None,
                                     range(4), cpu)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-3)
    assert (generate.sample_batch(eager_args, diffusion, eager_fn, None, range(4, 8), cpu) - eager).abs().max() > 0.1


def test_gen_sh_keeps_fp32_and_the_compile_default_and_passes_precision_and_compile_0(tmp_path):
    args = generate.parse_args(gen_sh_arguments(tmp_path))
    assert (args.precision, args.compile) == ("fp32", None)  # None: compiled on GPUs, as generate.py decides
    args = generate.parse_args(gen_sh_arguments(tmp_path, PRECISION="bf16", COMPILE="0"))
    assert (args.precision, args.compile) == ("bf16", False)
