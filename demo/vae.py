"""A small diffusers AutoencoderKL trained on the digits, standing in for stabilityai/sd-vae-ft-ema.

No pretrained VAE can be downloaded, so the demo trains one (downsampling 8, 4 latent channels, like
SD's) and saves it with `save_pretrained`; every later stage loads it by folder (`--vae FOLDER`).

SD's latents are multiplied by 0.18215 before the diffusion model sees them (the pipeline hard-codes
it, as the released code does), because SD's raw latents have a std of about 1 / 0.18215. After
training, `match_latent_scale` reparametrises this VAE exactly so that its latents have that std too:
the SiT then sees unit-variance latents, as it does on ImageNet.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

LATENT_SCALE = 0.18215  # the pipeline's fixed latent scaling (SiT-SRA/utils.py)


def build_vae():
    """Four encoder blocks (three downsamplings: 32 px -> 4x4 latents), 4 latent channels; narrow at full
    resolution, where the convolutions cost the most on a CPU."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 16, 32, 64), norm_num_groups=8, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def to_pixels(images):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the mapping of dataset_tools.py encode."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(images, steps, batch_size=16, lr=3e-3, kl_weight=1e-3, seed=0):
    """Trains on uint8 images (N, H, W, 3): L1 + MSE reconstruction of a posterior sample plus
    kl_weight * KL (per latent element). A small KL term, as in SD's VAE, keeps the posterior from
    collapsing to points; at this weight the reconstructions stay as recognisable as the digits
    themselves (the demo's classifier scores both alike)."""
    torch.manual_seed(seed)
    vae = build_vae()
    pixels = to_pixels(images)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    # Cosine decay: a short run ends with small steps, which sharpens the reconstructions.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(steps), desc="vae", unit="step")
    for _ in progress:
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_samples(vae, images, batch_size=500, seed=0):
    """Posterior samples (N, 4, h, w) of uint8 images, as the training pipeline draws them (unscaled)."""
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(to_pixels(images[start:start + batch_size])).latent_dist
        latents.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
    return torch.cat(latents)


@torch.no_grad()
def match_latent_scale(vae, images):
    """Rescales the latent space by k so that the posterior samples have std 1 / 0.18215: multiplies the
    mean half of quant_conv by k, adds 2 ln k to its log-variance bias (std scales by k too), and divides
    post_quant_conv's input weights by k. Decoding k z then equals decoding z before: the reconstructions
    are unchanged. Returns k."""
    k = 1 / (LATENT_SCALE * encode_samples(vae, images).std().item())
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= k
    vae.quant_conv.bias[:channels] *= k
    vae.quant_conv.bias[channels:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def reconstruct(vae, images, batch_size=500):
    """uint8 reconstructions (posterior means decoded) of uint8 images (N, H, W, 3)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_pixels(images[start:start + batch_size])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(torch.clamp(255 * (recon + 1) / 2, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy())
    return np.concatenate(out)
