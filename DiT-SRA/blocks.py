"""The diffusion transformer that SiT and DiT share: embedders, adaLN-Zero blocks, the final layer,
SRA's projection head, sin-cos positions and the model sizes.

Parameter names and shapes follow the released SiT / DiT / SRA checkpoints, so they load with
`load_state_dict(strict=True)`; docs/checkpoints.md lists them. Call contract of `DiffusionTransformer`:
    model(x, t, y)                     -> prediction (N, C_out, H, W)
    model(x, t, y, align_depth=K)      -> (prediction, ap_head(h_K))   h_K: tokens after block K, (N, T, D)
    model.features(x, t, y, depth=K)   -> h_K, running no block after K
x: (N, C, H, W) latents, t: (N,) times as the tree defines them, y: (N,) class ids, `num_classes` = null class.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), so each tree runs alone.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN modulation of tokens x (N, T, D) by per-sample shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                    Embedding layers for patches, timesteps and labels        #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) * (W / p), by a conv with kernel = stride = p."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar times (N,) -> (N, D): 256 sinusoidal frequencies, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) -> (N, dim): [cos(t f_k), sin(t f_k)] with f_k = exp(-ln(max_period) k / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class ids (N,) -> (N, D). With class dropout the table has a null row, id `num_classes`.

    The model never drops labels itself: the training loss replaces labels by the null id.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes

    def forward(self, labels):
        return self.embedding_table(labels)


#################################################################################
#                          Transformer blocks and head                          #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention over tokens (N, T, D), optional LayerNorm of queries and keys."""

    def __init__(self, dim, num_heads, qk_norm=False, fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Token MLP D -> hidden -> D with tanh-approximated GELU."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Transformer block with adaptive LayerNorm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, fused_attn=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        """x: (N, T, D) tokens, c: (N, D) conditioning."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class AlignHead(nn.Module):
    """The SRA projection head on student tokens: D -> 2D -> D with SiLU."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x):
        return self.linear2(self.act(self.linear1(x)))


class FinalLayer(nn.Module):
    """Tokens (N, T, D) -> patches (N, T, p * p * C_out), adaLN-modulated."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionTransformer(nn.Module):
    """Patch embedding, `depth` adaLN-Zero blocks and a final layer, with SRA's head on a chosen block.
    A tree's model subclasses it and fixes what its method predicts (`learn_sigma`)."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=False,
        fused_attn=True,
        qk_norm=False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by the patch size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.depth = depth

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
            for _ in range(depth)
        ])
        self.ap_head = AlignHead(hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid_size = int(self.pos_embed.shape[1] ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity, and the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p * p * C) -> (N, C, H, W); patch pixels laid out as (p, p, C)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def check_depth(self, depth, name):
        if not isinstance(depth, int) or not 1 <= depth <= self.depth:
            raise ValueError(f"{name}={depth!r} is outside 1..{self.depth}, the depth of this model")

    def embed(self, x, t, y):
        """Tokens (N, T, D) and conditioning (N, D) of the inputs."""
        return self.x_embedder(x) + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def features(self, x, t, y, depth):
        """Tokens (N, T, D) after block `depth` (1-based); the blocks after it are not run."""
        self.check_depth(depth, "depth")
        h, c = self.embed(x, t, y)
        for block in self.blocks[:depth]:
            h = block(h, c)
        return h

    def forward(self, x, t, y, align_depth=None):
        """Prediction (N, C_out, H, W); with align_depth=K also ap_head(h_K) (N, T, D)."""
        if align_depth is not None:
            self.check_depth(align_depth, "align_depth")
        h, c = self.embed(x, t, y)
        aligned = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i == align_depth:
                aligned = self.ap_head(h)
        out = self.unpatchify(self.final_layer(h, c))
        return out if align_depth is None else (out, aligned)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE's recipe: https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) float64: half the channels encode the row, half the column."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """Positions (M,) -> (M, embed_dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-2k/embed_dim)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                  Model sizes                                  #
#################################################################################

# name -> (depth, width, heads). Ti (DeiT-Ti: the depth of B and S at a quarter of B's width) and T (Ti at half
# depth) are beyond the papers, for CPU demos and tests.
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "Ti": (12, 192, 3),
         "T": (6, 192, 3)}
PATCHES = {"XL": (2, 4, 8), "L": (2, 4, 8), "B": (2, 4, 8), "S": (2, 4, 8), "Ti": (1, 2), "T": (1, 2)}


def registry(model_class, family):
    """{"<family>-<size>/<patch>": constructor taking the remaining keyword arguments} for every size."""
    return {f"{family}-{size}/{patch}": partial(model_class, depth=depth, hidden_size=width, patch_size=patch,
                                                num_heads=heads)
            for size, (depth, width, heads) in SIZES.items() for patch in PATCHES[size]}
