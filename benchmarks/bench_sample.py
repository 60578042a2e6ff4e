"""Times sampling, ours against the released code's, in one process: images/s and the ratio.

    python benchmarks/bench_sample.py --model SiT-B/2 --resolution 128 --num-samples 2 --precision fp32
    python benchmarks/bench_sample.py --model DiT-B/2 --resolution 128 --num-samples 2 --cfg-scale 1.5

SiT (SiT-... models): the Euler-Maruyama SDE sampler, --num-steps steps (250), classifier-free
guidance --cfg-scale on the interval [--guidance-low, --guidance-high] (1.8 on [0, 0.7], gen.sh's).
"ours" is what SiT-SRA/generate.py runs: `samplers.euler_maruyama_sampler` with the model wrapped
by `sampling_io.autocast_call` at --precision (its Linear and Conv weights cast once by
`sampling_io.cast_for_autocast`) and the per-sample step noise of `sampling_io.RowGenerators`;
"reference" is `reference_sample.reference_sde_sampler`, the released loop (float32 model, per-step
tensors, score on the doubled batch, on-device noise).

DiT (DiT-... models): respaced DDPM (`create_diffusion(str(--num-steps))`, p_sample_loop) with CFG
through `forward_with_cfg` on the [z; z] batch. "ours" is what DiT-SRA/generate.py runs (its
`guided_loop` / `plain_loop`, `autocast_call` at --precision, per-sample step noise); "reference"
is the same diffusion loop (which ports the released one step for step) with the released model
call: float32, no autocast, noise from `torch.randn_like` on the device.

Ours' network call goes through generate.py's compile path, `sampling_io.compile_call`: compiled with CUDA unless
--no-compile, eager on a CPU unless --compile; the warm-up run compiles it (one graph per batch shape).
The VAE decode is not timed. After a short warm-up run per mode, rounds alternate the modes
(reversing the order every round); each round times one full sampling run of --num-samples
images; medians over rounds are printed. Peak memory: on GPU the peak allocated during a mode's
runs, on CPU the process's maximum RSS (both modes).
"""
import argparse
import copy
import importlib
import resource
import statistics
import time

import torch

from common import add_threads_flag, import_tree, set_threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-B/2", help="SiT-... or DiT-... (picks the tree and the sampler)")
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels (latents are 1/8)")
    p.add_argument("--num-samples", type=int, default=2, help="images per sampling run (the batch)")
    p.add_argument("--num-steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.8)
    p.add_argument("--guidance-low", type=float, default=0.0, help="SiT only")
    p.add_argument("--guidance-high", type=float, default=0.7, help="SiT only")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="ours' autocast dtype")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile ours' network call as generate.py does; default: on with CUDA, off on CPU")
    p.add_argument("--no-reference", action="store_true", help="time ours only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_flag(p)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps of the untimed warm-up run per mode")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sit_modes(args, model, net, device):
    """{mode: run(num_steps) -> float64 samples} for the SDE sampler; ours calls `net`, the reference `model`."""
    sampling_io, samplers, reference_sample = (importlib.import_module(name) for name in
                                               ("sampling_io", "samplers", "reference_sample"))
    latent = args.resolution // 8
    labels = torch.arange(args.num_samples, device=device) % model.num_classes
    guidance = dict(cfg_scale=args.cfg_scale, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                    path_type="linear", null_class=model.num_classes)

    model_fn = sampling_io.compile_call(sampling_io.autocast_call(net, device, args.precision), device, args.compile)

    def ours(num_steps):
        rows = sampling_io.RowGenerators([sampling_io.sample_seed(args.seed, i) for i in range(args.num_samples)],
                                         device)
        latents = rows.randn((4, latent, latent))
        return samplers.euler_maruyama_sampler(model_fn, latents, labels, num_steps=num_steps,
                                               step_noise=rows.fill_normal, **guidance)

    def reference(num_steps):
        latents = torch.randn(args.num_samples, 4, latent, latent, device=device)
        return reference_sample.reference_sde_sampler(model, latents, labels, num_steps=num_steps, **guidance)

    return {"reference": reference, "ours": ours}


def dit_modes(args, model, net, device):
    """{mode: run(num_steps) -> samples} for respaced DDPM with CFG; ours calls `net`, the reference `model`."""
    sampling_io, generate, diffusion = (importlib.import_module(name) for name in
                                        ("sampling_io", "generate", "diffusion"))
    latent = args.resolution // 8
    labels = torch.arange(args.num_samples, device=device) % model.num_classes
    model_fn = generate.model_call(args, net, device)  # forward_with_cfg or forward, --precision, --compile

    def ours(num_steps):
        loop = diffusion.create_diffusion(str(num_steps)).p_sample_loop
        rows = sampling_io.RowGenerators([sampling_io.sample_seed(args.seed, i) for i in range(args.num_samples)],
                                         device)
        latents = rows.randn((4, latent, latent))
        if args.cfg_scale > 1:
            return generate.guided_loop(loop, model_fn, latents, labels, model.num_classes, args.cfg_scale,
                                        rows.fill_normal)
        return generate.plain_loop(loop, model_fn, latents, labels, rows.fill_normal)

    def reference(num_steps):
        loop = diffusion.create_diffusion(str(num_steps)).p_sample_loop
        z = torch.randn(args.num_samples, 4, latent, latent, device=device)
        if args.cfg_scale > 1:
            y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
            out = loop(model.forward_with_cfg, (2 * args.num_samples, 4, latent, latent), noise=torch.cat([z, z]),
                       clip_denoised=False, model_kwargs=dict(y=y, cfg_scale=args.cfg_scale), device=device)
            return out[:args.num_samples]
        return loop(model, z.shape, noise=z, clip_denoised=False, model_kwargs=dict(y=labels), device=device)

    return {"reference": reference, "ours": ours}


def main(args):
    set_threads(args)
    family = args.model.split("-")[0]
    models, sampling_io = import_tree(args.model, "models", "sampling_io")
    factories = getattr(models, f"{family}_models")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    model = factories[args.model](input_size=args.resolution // 8, num_classes=1000).to(device).eval()
    with torch.no_grad():  # trained-like weights: the zero-initialised gates and outputs would make every call trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    # ours' own copy, as generate.py builds it (weights cast once for autocast), compiled without touching the reference's
    net = sampling_io.cast_for_autocast(copy.deepcopy(model), args.precision)
    args.compile = device.type == "cuda" if args.compile is None else args.compile  # generate.py's default, printed
    modes = (sit_modes if family == "SiT" else dit_modes)(args, model, net, device)
    if args.no_reference:
        del modes["reference"]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    sampler = (f"SDE, CFG {args.cfg_scale} on [{args.guidance_low}, {args.guidance_high}]" if family == "SiT"
               else f"respaced DDPM, CFG {args.cfg_scale}")
    print(f"{args.model} {args.resolution}px, {args.num_samples} images per run, {args.num_steps} steps, {sampler}; "
          f"ours: precision {args.precision}, compile {args.compile}; reference: fp32; device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if cuda else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for name, run in modes.items():
        start = time.perf_counter()
        run(args.warmup_steps)
        sync()
        print(f"warm-up {name}: {args.warmup_steps} steps in {time.perf_counter() - start:.1f} s", flush=True)

    seconds, peaks = {name: [] for name in modes}, {name: 0 for name in modes}
    for r in range(args.rounds):
        for name in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            modes[name](args.num_steps)
            sync()
            seconds[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
        print(f"round {r + 1}: " + ", ".join(f"{name} {s[-1]:.1f} s" for name, s in seconds.items()), flush=True)

    print(f"\n{'mode':<10} {'images/s':>9} {'s/run':>8} {'ms/step':>8} {'peak mem GiB':>12}")
    for name, runs in seconds.items():
        s = statistics.median(runs)
        peak = peaks[name] / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{name:<10} {args.num_samples / s:>9.4f} {s:>8.1f} {1000 * s / args.num_steps:>8.1f} {peak:>12.2f}")
    if "reference" in seconds:
        ratio = statistics.median(seconds["reference"]) / statistics.median(seconds["ours"])
        print(f"ratio ours/reference images/s: {ratio:.2f}x")


if __name__ == "__main__":
    main(parse_args())
