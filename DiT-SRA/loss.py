"""The SRA objective for DiT: DDPM's MSE + variational-bound loss + self-representation alignment.

The student sees x_t at step t and its block `block_out_s` features (through the ap_head) are
pulled toward the EMA teacher's raw block `block_out_t` features at the less noisy step
t_teacher = clamp(t - k, 1, 999), k ~ U{0, ..., 1000 t_max - 1}, built from the same data and noise.
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("sml1", "l2", "l1", "cos")


def alignment(h_student, h_teacher, loss_type):
    """Alignment loss between (N, T, D) features: a scalar, or (N, D) for 'cos'.

    'cos' is PyTorch's default cosine similarity over dim=1, i.e. over the TOKEN axis (one
    similarity per channel), as in the released SiT code.
    """
    if loss_type == "sml1":
        return F.smooth_l1_loss(h_student, h_teacher, beta=0.05)
    if loss_type == "l2":
        return F.mse_loss(h_student, h_teacher)
    if loss_type == "l1":
        return F.l1_loss(h_student, h_teacher)
    if loss_type == "cos":
        return 1 - F.cosine_similarity(h_student, h_teacher)
    raise ValueError(f"unknown loss type {loss_type!r}: use one of {LOSS_TYPES}")


def align_weight(loss_type, epoch, resolution, base=0.4):
    """Weight of the alignment loss at `epoch` (0-based): constant 0.5 for 'cos', else `base`
    decayed by 10x over 1000 epochs after epoch 149 (256 px) or 800 epochs after 99 (512 px)."""
    if loss_type == "cos":
        return 0.5
    start, length = (99, 800) if resolution >= 512 else (149, 1000)
    exponent = (epoch - start) / length + 1 if epoch > start else 1
    return base * 0.1 ** exponent


class SRALoss:
    """loss_fn(model, x0, teacher, y) -> (denoising (N,), alignment as `alignment` returns it).

    diffusion: the 1000-step training diffusion (create_diffusion("")). teacher: the EMA model, or
    None for the no-SRA baseline (alignment 0, no teacher forward).
    Random draws, all on x0's device, in this order: t, noise, t_teacher, class dropout.
    """

    def __init__(self, diffusion, block_out_s=8, block_out_t=16, t_max=0.2, loss_type="sml1", cfg_prob=0.1,
                 num_classes=1000):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {loss_type!r}: use one of {LOSS_TYPES}")
        self.diffusion = diffusion
        self.block_out_s = block_out_s
        self.block_out_t = block_out_t
        self.max_gap = max(int(1000 * t_max), 1)
        self.loss_type = loss_type
        self.cfg_prob = cfg_prob
        self.num_classes = num_classes

    def __call__(self, model, x0, teacher, y):
        n, device = x0.shape[0], x0.device
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)
        noise = torch.randn_like(x0)
        t_teacher = torch.clamp(t - torch.randint(0, self.max_gap, (n,), device=device), 1, 999)
        x_t = self.diffusion.q_sample(x0, t, noise=noise)
        if self.cfg_prob > 0:
            drop = torch.rand(n, device=y.device) < self.cfg_prob
            y = torch.where(drop, self.num_classes, y)

        if teacher is None:
            output = model(x_t, t, y)
            terms = self.diffusion.training_losses_from_output(output, x0, x_t, t, noise)
            return terms["loss"], torch.zeros((), device=device)
        output, h_student = model(x_t, t, y, align_depth=self.block_out_s)
        with torch.no_grad():
            x_teacher = self.diffusion.q_sample(x0, t_teacher, noise=noise)
            h_teacher = teacher.features(x_teacher, t_teacher, y, depth=self.block_out_t)
        terms = self.diffusion.training_losses_from_output(output, x0, x_t, t, noise)
        return terms["loss"], alignment(h_student, h_teacher, self.loss_type)
