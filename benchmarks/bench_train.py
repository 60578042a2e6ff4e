"""Times complete SRA training steps, ours against the released code's, in one process.

    python benchmarks/bench_train.py --model SiT-B/2 --resolution 128 --batch-size 8 --mixed-precision no
    python benchmarks/bench_train.py --model SiT-XL/2 --resolution 256 --batch-size 32 --mixed-precision bf16 --compile

A step is everything train.py does per batch once the batch is on the device: posterior sample
(data->x0), student forward + backward, teacher forward, gradient clipping + AdamW (optimizer),
EMA update. "ours" calls `training.train_step`, the function train.py's loop calls, built the way
train.py builds it (fused AdamW, EMA copied after `prepare`, `training.compile_models` with
--compile). "reference" calls `reference_step.reference_step`: full-depth float32 teacher outside
autocast, default AdamW, per-parameter EMA loop, `.item()` of the losses every step. Both start
from the same weights and see the same (synthetic, device-resident) batch: data loading is not
timed. After warm-up, rounds alternate the two modes (reversing the order every round), each
round timing --steps steps between two syncs; medians over rounds are printed. A separate
instrumented pass, which syncs between phases, gives the per-phase breakdown.

Model FLOPs are counted analytically from the config (multiply-add = 2 FLOPs), per sample, with
D the width, T the tokens, p the patch, C_in / C_out the channels, L the depth:
    block      24 T D^2 (qkv 6, proj 2, mlp 16) + 4 T^2 D (QK^T and AV) + 12 D^2 (adaLN, per sample)
    embed      2 T C_in p^2 D (patch conv) + 2 (256 D + D^2) (timestep MLP)
    head       8 T D^2 (the SRA projection D -> 2D -> D)
    final      4 D^2 (adaLN) + 2 T D p^2 C_out
    step       3 (embed + L block + head + final)    student forward + backward (backward = 2 forward)
             + embed + K_t block                      teacher forward to --block-out-t
The same count (the FLOPs the method needs) is used for both modes, so the reference's extra
teacher blocks and attention recomputation are not counted. MFU = FLOPs per step x steps/s /
--peak-tflops (default: H100 SXM dense bf16, 989 TFLOP/s), printed on GPU only.

Graph breaks: `torch._dynamo.explain` of what `training.compile_models` compiles, the student's
forward as the loss calls it and the teacher's `features`, on this batch (printed before warm-up;
0 means each compiles into one graph). Host-device syncs: one step of each mode under torch's CUDA
sync debug mode (GPU only; n/a on a CPU, where host and device are one).

Peak memory: on GPU, the peak allocated during a mode's timed steps minus the other mode's
resident state (weights, EMA, optimizer state); on CPU, the process's maximum RSS (both modes).
"""
import argparse
import copy
import resource
import statistics
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import torch

from common import add_threads_flag, import_tree, set_threads

PHASES = ("data->x0", "student fwd+bwd", "teacher fwd", "optimizer", "EMA", "log sync")
PHASE_OF_MARK = {"data": "data->x0", "loss_backward": "student fwd+bwd", "optimizer": "optimizer", "ema": "EMA",
                 "log": "log sync"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SiT-B/2", help="SiT-... or DiT-... (picks the tree)")
    p.add_argument("--resolution", type=int, default=128, help="image side in pixels (latents are 1/8)")
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--compile", action="store_true", help="ours compiled as train.py --compile does")
    p.add_argument("--block-out-s", type=int, default=None, help="default: train.py's for 28-deep models, else depth/3")
    p.add_argument("--block-out-t", type=int, default=None, help="default: train.py's for 28-deep models, else 2 depth/3")
    p.add_argument("--no-reference", action="store_true", help="time ours only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_flag(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (compilation happens here)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--breakdown-steps", type=int, default=1, help="steps of the instrumented pass per mode")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_dims(model):
    """(depth L, width D, tokens T, patch p, C_in, C_out) of a SiT / DiT instance."""
    _, tokens, hidden = model.pos_embed.shape
    return model.depth, hidden, tokens, model.patch_size, model.in_channels, model.out_channels


def step_flops(model, batch_size, block_out_t):
    """Model FLOPs of one SRA training step (formula in the module docstring)."""
    depth, D, T, p, c_in, c_out = model_dims(model)
    block = 24 * T * D * D + 4 * T * T * D + 12 * D * D
    embed = 2 * T * c_in * p * p * D + 2 * (256 * D + D * D)
    head = 8 * T * D * D
    final = 4 * D * D + 2 * T * D * p * p * c_out
    return batch_size * (3 * (embed + depth * block + head + final) + embed + block_out_t * block)


class PhaseClock:
    """Accumulates wall time per phase; every mark syncs the device first."""

    def __init__(self, sync):
        self.sync, self.totals, self.last = sync, defaultdict(float), None

    def start(self):
        self.sync()
        self.last = time.perf_counter()

    def __call__(self, mark):
        self.sync()
        now = time.perf_counter()
        self.totals[PHASE_OF_MARK.get(mark, mark)] += now - self.last
        self.last = now


class TimedTeacher:
    """A teacher whose `features` call closes the student's running phase and times itself."""

    def __init__(self, teacher, clock):
        self.teacher, self.clock = teacher, clock

    def features(self, *args, **kwargs):
        self.clock("student fwd+bwd")
        out = self.teacher.features(*args, **kwargs)
        self.clock("teacher fwd")
        return out


def host_syncs(step):
    """Where one step synchronises the host with the GPU: "file:line" of each synchronising call,
    from torch's CUDA sync debug mode (which warns on .item(), blocking copies, ...)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def graph_breaks(mode, moments, labels):
    """{compiled function: (graphs, graph breaks, break reasons)} that `torch._dynamo.explain` finds in
    what `training.compile_models` compiles, called as the loss calls them: the student's forward
    with align_depth (under autocast) and the teacher's `features` (also under no_grad). Runs before
    any compiled call: explain resets dynamo's caches."""
    x, t = moments[:, :4], torch.rand(moments.shape[0], device=moments.device)
    loss_fn, student, teacher = mode.loss_fn, mode.raw_model, mode.ema_model
    calls = {"student forward": lambda: torch._dynamo.explain(student.forward)(x, t, labels,
                                                                             align_depth=loss_fn.block_out_s),
             "teacher features": lambda: torch._dynamo.explain(type(teacher).features.__get__(teacher))(
                 x, t, labels, depth=loss_fn.block_out_t)}
    found = {}
    for name, explain in calls.items():
        with mode.accelerator.autocast(), torch.set_grad_enabled(name == "student forward"):
            result = explain()
        found[name] = (result.graph_count, result.graph_break_count, [str(r.reason) for r in result.break_reasons])
    return found


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Mode:
    """One way of stepping (ours or reference) with its own model, EMA, optimizer and accelerator."""

    def __init__(self, name, modules, args, cfg, base_state, moments, labels):
        from accelerate import Accelerator

        train, training, alignment, loss, models, reference_step = modules
        self.name, self.training, self.max_grad_norm = name, training, cfg.max_grad_norm
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
        model = build_model(models, args, cfg)
        model.load_state_dict(base_state)
        self.batch = (moments, labels)
        self.align_w = alignment.align_weight(cfg.loss_type, 0, args.resolution, train.ALIGN_BASE_WEIGHT)
        if name == "reference":
            # copied before prepare (and moved by hand), as the released code does
            ema = copy.deepcopy(model).to(self.accelerator.device).eval().requires_grad_(False)
            optimizer = reference_step.reference_optimizer(
                model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.raw_model, self.ema_model = self.accelerator.unwrap_model(self.model), ema
            self.loss_fn = build_loss(loss, cfg, reference_step.FullDepthTeacher(ema))
            self._step = lambda phase_end: reference_step.reference_step(
                self.accelerator, self.model, self.optimizer, self.loss_fn, *self.batch, self.align_w,
                cfg.max_grad_norm, ema, self.raw_model, phase_end)
        else:  # built as train.py builds it
            self.model, self.optimizer = self.accelerator.prepare(model, training.fused_adamw(model, cfg))
            self.raw_model = self.accelerator.unwrap_model(self.model)
            self.ema = training.EMA(self.raw_model, cfg.ema_decay)
            self.ema_model = self.ema.model
            if args.compile:
                training.compile_models(self.raw_model, self.ema.model)
            self.loss_fn = build_loss(loss, cfg, self.ema.model)
            self._step = lambda phase_end: (self.timed_step(phase_end) if phase_end else training.train_step(
                self.accelerator, self.model, self.optimizer, self.loss_fn, self.ema, *self.batch, self.align_w,
                cfg.max_grad_norm))
        self.ms_per_step, self.peak_bytes, self.breakdown, self.syncs = [], None, {}, []

    def timed_step(self, mark):
        """training.train_step's phases one by one, with `mark(phase)` after each (the instrumented pass)."""
        training, accelerator = self.training, self.accelerator
        with accelerator.accumulate(self.model):
            x0 = training.sample_posterior(self.batch[0])
            mark("data")
            training.loss_backward(accelerator, self.model, self.loss_fn, x0, self.batch[1], self.align_w)
            mark("loss_backward")
            training.optimizer_step(accelerator, self.model, self.optimizer, self.max_grad_norm)
            mark("optimizer")
        self.ema.update()
        mark("ema")

    def step(self, phase_end=None):
        return self._step(phase_end)

    def timed_breakdown(self, clock):
        """One instrumented step whose teacher closes the student's phase and times itself."""
        teacher = self.loss_fn.teacher
        self.loss_fn.teacher = TimedTeacher(teacher, clock)
        try:
            self.step(phase_end=clock)
        finally:
            self.loss_fn.teacher = teacher

    def resident_bytes(self):
        """Bytes this mode keeps between steps: weights, EMA and optimizer state."""
        state = [v for s in self.optimizer.optimizer.state.values() for v in s.values()]
        return tensor_bytes([*self.raw_model.parameters(), *self.ema_model.parameters(), *state])


def build_model(models, args, cfg):
    factories = getattr(models, f"{args.model.split('-')[0]}_models")
    if args.model not in factories:
        sys.exit(f"error: --model {args.model}: not one of {sorted(factories)}")
    return factories[args.model](input_size=args.resolution // 8, num_classes=cfg.num_classes,
                                 class_dropout_prob=cfg.cfg_prob, fused_attn=cfg.fused_attn, qk_norm=cfg.qk_norm)


def build_loss(loss, cfg, teacher):
    """The tree's SRALoss with train.py's defaults and the given teacher."""
    if hasattr(cfg, "path_type"):
        return loss.SRALoss(prediction=cfg.prediction, path_type=cfg.path_type, weighting=cfg.weighting,
                            block_out_s=cfg.block_out_s, block_out_t=cfg.block_out_t, t_max=cfg.t_max,
                            loss_type=cfg.loss_type, cfg_prob=cfg.cfg_prob, num_classes=cfg.num_classes,
                            teacher=teacher)
    from diffusion import create_diffusion

    return loss.SRALoss(create_diffusion(timestep_respacing=""), block_out_s=cfg.block_out_s,
                        block_out_t=cfg.block_out_t, t_max=cfg.t_max, loss_type=cfg.loss_type,
                        cfg_prob=cfg.cfg_prob, num_classes=cfg.num_classes, teacher=teacher)


def main(args):
    set_threads(args)
    modules = import_tree(args.model, "train", "training", "alignment", "loss", "models", "reference_step")
    train, models = modules[0], modules[4]
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    # train.py's defaults for everything the step uses
    cfg = train.parse_args(["--exp-name", "bench", "--data-dir", "unused", "--model", args.model])
    torch.manual_seed(args.seed)
    base = build_model(models, args, cfg)
    if base.depth != 28:  # train.py's defaults are for the 28-deep XL models
        cfg.block_out_s, cfg.block_out_t = base.depth // 3, 2 * base.depth // 3
    cfg.block_out_s = args.block_out_s or cfg.block_out_s
    cfg.block_out_t = args.block_out_t or cfg.block_out_t
    latent = args.resolution // 8
    gen = torch.Generator().manual_seed(args.seed)
    moments = torch.cat([5 * torch.randn(args.batch_size, 4, latent, latent, generator=gen),
                         0.01 + 0.09 * torch.rand(args.batch_size, 4, latent, latent, generator=gen)], dim=1)
    labels = torch.randint(0, cfg.num_classes, (args.batch_size,), generator=gen)
    moments, labels = moments.to(device), labels.to(device)

    names = ["ours"] if args.no_reference else ["reference", "ours"]
    modes = {name: Mode(name, modules, args, cfg, base.state_dict(), moments, labels) for name in names}
    del base
    flops = step_flops(modes["ours"].raw_model, args.batch_size, cfg.block_out_t)
    print(f"{args.model} {args.resolution}px (latent {latent}x{latent}), batch {args.batch_size}, "
          f"precision {args.mixed_precision}, compile {args.compile}, block-out-s {cfg.block_out_s}, "
          f"block-out-t {cfg.block_out_t} of {modes['ours'].raw_model.depth}; device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if cuda else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model FLOPs per step {flops / 1e12:.4f} TFLOP", flush=True)

    if torch._dynamo.config.disable:  # TORCH_COMPILE_DISABLE=1: dynamo traces nothing
        print("graph breaks (torch._dynamo.explain) in ours' compiled functions: n/a (dynamo disabled)")
    else:
        breaks = graph_breaks(modes["ours"], moments, labels)
        print("graph breaks (torch._dynamo.explain) in ours' compiled functions: " + ", ".join(
            f"{name} {n_breaks} ({graphs} graph{'s' if graphs != 1 else ''})"
            for name, (graphs, n_breaks, _) in breaks.items()), flush=True)
        for name, (_, _, reasons) in breaks.items():
            for reason in reasons:
                print(f"  {name}: {reason}")

    for mode in modes.values():
        sync()
        start = time.perf_counter()
        for _ in range(args.warmup):
            mode.step()
        sync()
        print(f"warm-up {mode.name}: {args.warmup} steps in {time.perf_counter() - start:.1f} s", flush=True)

    for r in range(args.rounds):
        order = list(modes.values()) if r % 2 == 0 else list(modes.values())[::-1]
        for mode in order:
            other = sum(m.resident_bytes() for m in modes.values() if m is not mode)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                mode.step()
            sync()
            mode.ms_per_step.append(1000 * (time.perf_counter() - start) / args.steps)
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) - other
                mode.peak_bytes = max(mode.peak_bytes or 0, peak)
        print(f"round {r + 1}: " + ", ".join(f"{m.name} {m.ms_per_step[-1]:.1f} ms/step" for m in modes.values()),
              flush=True)

    for mode in modes.values():
        clock = PhaseClock(sync)
        for _ in range(args.breakdown_steps):
            clock.start()
            mode.timed_breakdown(clock)
        mode.breakdown = {k: 1000 * v / args.breakdown_steps for k, v in clock.totals.items()}
        if cuda:
            mode.syncs = host_syncs(mode.step)

    print(f"\n{'mode':<10} {'images/s':>9} {'ms/step':>9} " + " ".join(f"{p:>15}" for p in PHASES)
          + f" {'peak mem GiB':>12}" + (f" {'MFU':>6}" if cuda else f" {'GFLOP/s':>8}"))
    for mode in modes.values():
        ms = statistics.median(mode.ms_per_step)
        achieved = flops / (ms / 1000)
        peak = mode.peak_bytes / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        util = f" {100 * achieved / (args.peak_tflops * 1e12):>5.1f}%" if cuda else f" {achieved / 1e9:>8.1f}"
        print(f"{mode.name:<10} {args.batch_size * 1000 / ms:>9.2f} {ms:>9.1f} "
              + " ".join(f"{mode.breakdown.get(p, 0.0):>15.1f}" for p in PHASES) + f" {peak:>12.2f}" + util)
    print("(breakdown in ms from the instrumented pass, which syncs between phases; "
          + ("peak memory per mode)" if cuda else "peak memory = process max RSS, both modes)"))
    if "reference" in modes:
        ratio = statistics.median(modes["reference"].ms_per_step) / statistics.median(modes["ours"].ms_per_step)
        print(f"ratio ours/reference images/s: {ratio:.2f}x")
    for mode in modes.values():
        if cuda:
            where = ", ".join(f"{place} x{n}" for place, n in Counter(mode.syncs).most_common())
            print(f"host-device syncs in one {mode.name} step: {len(mode.syncs)}{' (' + where + ')' if where else ''}")
        else:
            print(f"host-device syncs in one {mode.name} step: n/a on a CPU (counted on CUDA only)")


if __name__ == "__main__":
    main(parse_args())
