"""The SRA objective for DiT: DDPM's MSE + variational-bound loss + self-representation alignment.

The student sees x_t at step t and its block `block_out_s` features (through the ap_head) are
pulled toward the EMA teacher's raw block `block_out_t` features at the less noisy step
t_teacher = clamp(t - k, 1, 999), k ~ U{0, ..., 1000 t_max - 1}, built from the same data and noise.
"""
import torch

from alignment import alignment, check_loss_type, teacher_features


class SRALoss:
    """loss_fn(model, x0, y) -> (denoising (N,), alignment as `alignment.alignment` returns it).

    diffusion: the 1000-step training diffusion (create_diffusion("")). teacher: the EMA model,
    whose `features` up to block `block_out_t` are the targets, or None for the no-SRA baseline
    (alignment 0, no teacher forward). teacher_fp32: run it in float32 outside the caller's autocast, as
    the released code did (`alignment.teacher_features`).
    Random draws, all on x0's device, in this order: t, noise, t_teacher, class dropout.
    """

    def __init__(self, diffusion, block_out_s=8, block_out_t=16, t_max=0.2, loss_type="sml1", cfg_prob=0.1,
                 num_classes=1000, teacher=None, teacher_fp32=False):
        check_loss_type(loss_type)
        self.diffusion = diffusion
        self.block_out_s = block_out_s
        self.block_out_t = block_out_t
        self.max_gap = max(int(1000 * t_max), 1)
        self.loss_type = loss_type
        self.cfg_prob = cfg_prob
        self.num_classes = num_classes
        self.teacher = teacher
        self.teacher_fp32 = teacher_fp32

    def __call__(self, model, x0, y):
        n, device = x0.shape[0], x0.device
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)
        noise = torch.randn_like(x0)
        t_teacher = torch.clamp(t - torch.randint(0, self.max_gap, (n,), device=device), 1, 999)
        x_t = self.diffusion.q_sample(x0, t, noise=noise)
        if self.cfg_prob > 0:
            drop = torch.rand(n, device=y.device) < self.cfg_prob
            y = torch.where(drop, self.num_classes, y)

        if self.teacher is None:
            output = model(x_t, t, y)
            terms = self.diffusion.training_losses_from_output(output, x0, x_t, t, noise)
            return terms["loss"], torch.zeros((), device=device)
        output, h_student = model(x_t, t, y, align_depth=self.block_out_s)
        with torch.no_grad():
            x_teacher = self.diffusion.q_sample(x0, t_teacher, noise=noise)
        h_teacher = teacher_features(self.teacher, x_teacher, t_teacher, y, self.block_out_t, self.teacher_fp32)
        terms = self.diffusion.training_losses_from_output(output, x0, x_t, t, noise)
        return terms["loss"], alignment(h_student, h_teacher, self.loss_type)
