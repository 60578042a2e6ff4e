"""The released SRA code's training step, rebuilt for side-by-side timing and equivalence tests.

It computes the same update as `training.train_step` (same loss, same random draws, same
clipping) but spends its time the way the released code does:
- the teacher runs the whole EMA model (every block and the final layer) and keeps the tokens of
  block K, in float32 outside autocast (under no_grad);
- the optimizer is `torch.optim.AdamW` as the released code builds it, with PyTorch's default
  implementation (a per-parameter loop on the CPU, `foreach` on CUDA), not the fused kernel;
- the EMA moves one parameter at a time in a Python loop over `named_parameters`;
- every step reads the gathered losses and gradient norm back to the host with `.item()`.
Attention is the model's own (SDPA in both), since the released models use SDPA too.

Import it with a tree (SiT-SRA/ or DiT-SRA/) on sys.path: it uses that tree's `sample_posterior`
and the EMA decay of its `training`.
"""
from collections import OrderedDict

import torch

from dataset import sample_posterior
from training import EMA_DECAY


def reference_optimizer(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8):
    """AdamW with the released code's arguments and PyTorch's default (non-fused) implementation."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


class FullDepthTeacher:
    """The released teacher: `features(x, t, y, depth=K)` runs the full EMA model in float32 outside
    autocast and returns the tokens (N, T, D) after block K, caught by a forward hook.

    ema: the EMA model, copied before `accelerator.prepare` (as the released code does), so its
    forward carries no autocast wrapper.
    """

    def __init__(self, ema):
        self.ema = ema

    @torch.no_grad()
    def features(self, x, t, y, depth):
        self.ema.check_depth(depth, "depth")
        caught = []
        hook = self.ema.blocks[depth - 1].register_forward_hook(lambda module, args, out: caught.append(out))
        try:
            with torch.autocast(x.device.type, enabled=False):
                self.ema(x, t, y)
        finally:
            hook.remove()
        return caught[0]


@torch.no_grad()
def reference_update_ema(ema, model, decay=EMA_DECAY):
    """ema = decay * ema + (1 - decay) * param, one parameter at a time, matched by name."""
    ema_params = OrderedDict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name.replace("module.", "")].mul_(decay).add_(param.data, alpha=1 - decay)


def reference_step(accelerator, model, optimizer, loss_fn, moments, labels, align_w, max_grad_norm, ema, raw_model,
                   phase_end=None):
    """One micro-batch as the released train.py runs it; arguments as `training.train_step`, except:

    loss_fn: the tree's SRALoss holding a FullDepthTeacher (or None for no alignment); optimizer:
    prepared from `reference_optimizer`; ema, raw_model: the EMA model and the unwrapped student.
    phase_end: optional callable(phase) after "data", "loss_backward", "optimizer", "ema", "log".
    Returns (denoising loss, alignment loss, gradient norm) as Python floats, read every step.
    """
    mark = phase_end or (lambda phase: None)
    with torch.no_grad():
        x0 = sample_posterior(moments)
    mark("data")
    with accelerator.accumulate(model):
        with accelerator.autocast():
            denoising, align = loss_fn(model, x0, labels)
            denoising_mean, align_mean = denoising.mean(), align.mean()
            loss = denoising_mean + align_w * align_mean
        accelerator.backward(loss)
        mark("loss_backward")
        grad_norm = torch.zeros((), device=x0.device)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
    if accelerator.sync_gradients:
        reference_update_ema(ema, raw_model)
        mark("ema")
    logs = tuple(accelerator.gather(value.detach()).mean().item() for value in (denoising_mean, align_mean, grad_norm))
    mark("log")
    return logs
