"""DiT (Diffusion Transformer) with the SRA projection head.

The transformer is blocks.DiffusionTransformer (shared with SiT, call contract there). DiT predicts
DDPM's noise and variance: model(x, t, y) -> (N, 2C, H, W), epsilon (C channels) and the variance
interpolation (C), with t: (N,) integer diffusion steps 0..999. Parameter names follow the released
DiT checkpoints plus SRA's `ap_head` (strict loading).
"""
import torch

from blocks import DiffusionTransformer, registry

FAMILY = "DiT"


class DiT(DiffusionTransformer):
    """Diffusion transformer predicting the noise and the variance of DDPM, with an SRA head."""

    def __init__(self, learn_sigma=True, **kwargs):
        super().__init__(learn_sigma=learn_sigma, **kwargs)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Guided output for a batch [cond; uncond] of 2N rows (x's second half is ignored: both
        halves use the first). As in DiT, guidance mixes only the first 3 channels of epsilon and
        passes the rest through, which its released FID numbers depend on."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


DiT_models = registry(DiT, FAMILY)
