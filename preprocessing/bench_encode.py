"""Encode throughput: the released tool's way (one image at a time, float32, decoding in the main
process) against ours (batched, decoding in DataLoader workers), in one run on one machine.

    python bench_encode.py                      # random SD-VAE weights: 256px on GPU, 64px on CPU
    python bench_encode.py --tiny               # a small VAE: a quick check
    python bench_encode.py --model-url mse      # the real stabilityai/sd-vae-ft-mse (hub or local folder)

Both ways call dataset_tools.encode_dataset, the function behind `dataset_tools.py encode`, on
the same folder of random PNGs, so the figures include decoding and writing the .npy files.
Prints images/s for each, their ratio, and the largest difference between their outputs.
"""
import argparse
import os
import tempfile
import time

import numpy as np
import PIL.Image
import torch

import dataset_tools as dt

# The encoder and decoder layout of stabilityai/sd-vae-ft-mse (and -ema), for random weights.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=32)


def build_vae(args, device):
    """The VAE to time: loaded from --model-url, else randomly initialised (offline)."""
    if args.model_url:
        return dt.load_vae(args.model_url, device)
    from diffusers import AutoencoderKL  # imported here like dataset_tools does: it is slow to import

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **(TINY_VAE if args.tiny else SD_VAE))
    return vae.to(device).eval().requires_grad_(False)


def write_images(folder, count, size):
    """`count` random RGB PNGs of size x size laid out as convert writes them; returns the items."""
    rng = np.random.default_rng(0)
    labels = []
    for index in range(count):
        path = os.path.join(folder, dt.image_name(index))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, compress_level=1)
        labels.append([dt.image_name(index), index % 1000])
    dt.write_json(os.path.join(folder, "dataset.json"), labels)
    return [(name, label) for name, label in labels]


def timed_encode(source, items, dest, vae, batch_size, workers):
    """Seconds for one encode_dataset run into the fresh folder `dest`."""
    if vae.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    dt.encode_dataset(source, items, dest, vae, batch_size, workers)
    if vae.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-url", help="ema | mse | hub name | local folder (default: random SD-VAE weights)")
    parser.add_argument("--tiny", action="store_true", help="a small random VAE instead of the SD-VAE layout")
    parser.add_argument("--resolution", type=int, default=256 if gpu else 64, help="image side (multiple of 8)")
    parser.add_argument("--num-images", type=int, default=512 if gpu else 32)
    parser.add_argument("--batch-size", type=int, default=dt.DEFAULT_BATCH_SIZE, help="our batch size")
    parser.add_argument("--workers", type=int, default=dt.DEFAULT_WORKERS, help="our decoding processes")
    args = parser.parse_args()

    device = torch.device("cuda" if gpu else "cpu")
    vae = build_vae(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "images")
        items = write_images(images, args.num_images, args.resolution)
        source = dt.Source(images)
        # Warm-up at both batch sizes, so lazy initialisation and kernel choice are not timed.
        warm = torch.zeros(min(args.batch_size, args.num_images), 3, args.resolution, args.resolution, dtype=torch.uint8)
        dt.encode_batch(vae, warm[:1])
        dt.encode_batch(vae, warm)
        released = timed_encode(source, items, os.path.join(tmp, "released"), vae, batch_size=1, workers=0)
        ours = timed_encode(source, items, os.path.join(tmp, "ours"), vae, args.batch_size, args.workers)
        diff = max(float(np.abs(np.load(os.path.join(tmp, "released", dt.latent_name(name))) -
                                np.load(os.path.join(tmp, "ours", dt.latent_name(name)))).max()) for name, _ in items)

    vae_name = args.model_url or ("random tiny VAE" if args.tiny else "random SD-VAE layout")
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; {vae_name}; {args.num_images} images of {args.resolution}x{args.resolution}")
    print(f"released (batch 1, main-process decoding): {args.num_images / released:8.2f} images/s")
    print(f"ours (batch {args.batch_size}, {args.workers} decoding workers): {args.num_images / ours:8.2f} images/s")
    print(f"ratio ours / released: {released / ours:.2f}x   largest output difference: {diff:.2e}")


if __name__ == "__main__":
    main()
