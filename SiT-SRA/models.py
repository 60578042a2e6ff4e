"""SiT (Scalable Interpolant Transformer) with the SRA projection head.

The transformer is blocks.DiffusionTransformer (shared with DiT, call contract there). SiT predicts
the velocity of the interpolant: model(x, t, y) -> velocity (N, C, H, W), with t: (N,) time in
[0, 1] (1 = noise). Parameter names follow the released SiT / SRA checkpoints (strict loading).
"""
from blocks import DiffusionTransformer, registry

FAMILY = "SiT"


class SiT(DiffusionTransformer):
    """Diffusion transformer predicting the velocity of the interpolant, with an SRA head."""

    def __init__(self, learn_sigma=False, **kwargs):
        super().__init__(learn_sigma=learn_sigma, **kwargs)


SiT_models = registry(SiT, FAMILY)
