"""PCA of a SiT's intermediate features for one image: one row per noise level, one column per block.

    cd pca-vis
    python main_pca.py --ckpt CKPT.pt                        # an SRA (or our train.py) checkpoint
    python main_pca.py --ckpt sitxl-sra-res256-ep800.pt      # a released one, downloaded once by name
    python main_pca.py --ckpt SiT-XL-2-256x256.pt --baseline  # an original SiT checkpoint

The released recipe, which drew the paper's figure: the image is resized to --resolution x --resolution
(no crop), VAE-encoded, a posterior sample x 0.18215 noised to x_t = (1 - t) x + t noise for each --times,
and run through the EMA model; the tokens after each block of --layers are normalised (LayerNorm per
token; per-channel min-max for --baseline) and get a 3-component PCA shown as RGB. The model comes
from ../SiT-SRA/models.py.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "SiT-SRA"))  # the model and helpers are SiT-SRA's, not a copy

from models import SiT_models  # noqa: E402
from utils import (LATENT_SCALE, RELEASED_CHECKPOINTS, UserError, check_writable, checkpoint_file,  # noqa: E402
                   learns_sigma, load_checkpoint, load_vae, load_weights, model_state_dict, run_main,
                   with_own_head)

DEFAULT_IMAGE = HERE / "assets" / "default.png"

# Layout of the output grid, in pixels: a label row on top, a label column on the left, then
# one TILE x TILE cell per (time, column) with GAP pixels after each cell (right and below).
TILE = 128
GAP = 4
LABEL_W = 56
LABEL_H = 24
FONT_SIZE = 14


def str2bool(value):
    """'true'/'false' (also yes/no, 1/0), for the released README's `--baseline=False`."""
    lowered = value.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True,
                   help="training checkpoint (its 'ema' weights are used) or a bare state dict; or a released name, "
                        f"{' / '.join(RELEASED_CHECKPOINTS)}, downloaded once into the Hugging Face cache")
    p.add_argument("--baseline", type=str2bool, nargs="?", const=True, default=False,
                   help="the checkpoint is an original SiT one (no ap_head, learned sigma, t=1 is data); its features "
                        "are min-maxed per channel instead of LayerNorm; also accepts --baseline=True/False")
    p.add_argument("--legacy", action=argparse.BooleanOptionalAction, default=True,
                   help="with --baseline, feed the model t as the released script did for the paper's figures "
                        "(default); --no-legacy feeds 1 - t, the original SiT's own time convention")
    p.add_argument("--center-crop", "--center_crop", dest="center_crop", action="store_true",
                   help="cut the central square of the image before resizing (default: resize the whole image, "
                        "as released, which squeezes a non-square one)")
    p.add_argument("--img_path", "--img-path", dest="img_path", default=str(DEFAULT_IMAGE),
                   help="input image (default: assets/default.png, a synthetic parrot on a branch)")
    p.add_argument("--save_path", "--save-path", dest="save_path", default=None,
                   help="output PNG (default: <ckpt stem>-pca.png next to the checkpoint)")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4, 8, 13, 18, 23, 28],
                   help="blocks (1-based) whose output tokens are shown, one column each")
    p.add_argument("--times", type=float, nargs="+", default=[0.7, 0.5, 0.3, 0.1],
                   help="noise levels t in [0, 1] (1 = pure noise), one row each")
    p.add_argument("--label_id", "--label-id", dest="label_id", type=int, default=88,
                   help="class label given to the model (88: macaw); --num-classes is the null class")
    p.add_argument("--thr", type=float, default=0.0,
                   help="background threshold: tokens whose first PCA component (min-maxed to [0, 1]) is "
                        "below thr are drawn black; 0 shows every token")
    p.add_argument("--model", choices=sorted(SiT_models), default=None,
                   help="default: a released checkpoint's (by file name), else SiT-XL/2")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels (a multiple of 8); default: a released checkpoint's, else 256")
    p.add_argument("--vae", default="mse", help="mse (stabilityai/sd-vae-ft-mse, as released) | ema | hub name | "
                                                "local folder")
    p.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the posterior samples and the noise (one CPU generator, drawn time by time)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    known = RELEASED_CHECKPOINTS.get(Path(args.ckpt).name, {})
    args.model = args.model or known.get("model", "SiT-XL/2")
    args.resolution = known.get("resolution", 256) if args.resolution is None else args.resolution
    return args


def load_image(path, resolution, center_crop=False):
    """uint8 (resolution, resolution, 3): the whole image resized with BILINEAR, as torchvision's
    Resize((resolution, resolution)) does to a PIL image (the released recipe); center_crop first cuts
    out the central square, so a non-square image keeps its aspect ratio."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--img_path {path}: no such file")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--img_path {path}: not a readable image ({e})") from None
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return np.array(image.resize((resolution, resolution), Image.BILINEAR))  # a writable copy, for torch.from_numpy


@torch.no_grad()
def posterior(vae, pixels):
    """uint8 (H, W, 3) -> the VAE posterior's mean and std, each (1, 4, H/8, W/8) float32 on the CPU."""
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def noisy_latents(mean, std, times, generator):
    """x_t (len(times), 4, h, w) from the posterior's mean and std (1, 4, h, w), one row per time.

    As in the released script, each time has its own draws, in this order: a posterior sample
    x = (mean + std * eps) * 0.18215, then the noise; x_t = (1 - t) x + t noise.
    """
    rows = []
    for t in times:
        x = (mean + std * torch.randn(mean.shape, generator=generator)) * LATENT_SCALE
        noise = torch.randn(x.shape, generator=generator)
        rows.append((1 - t) * x + t * noise)
    return torch.cat(rows)


def model_times(times, baseline, legacy):
    """(len(times),) float32: the time the model is given. The original SiT reads time the other way round
    (t = 1 is data), but the released script fed it t all the same (legacy), which is how the paper's
    figures were made; legacy=False gives it 1 - t."""
    t = torch.tensor(times, dtype=torch.float32)
    return 1 - t if baseline and not legacy else t


@torch.no_grad()
def extract_features(model, x, t, y, layers):
    """{K: tokens (N, T, D) after block K} for each K in layers, equal to model.features(x, t, y, depth=K).

    One forward up to the deepest layer; a hook on each requested block keeps its output.
    """
    for k in layers:
        if not 1 <= k <= model.depth:
            raise ValueError(f"layer {k} is outside 1..{model.depth}, the depth of the model")
    captured = {}
    hooks = [model.blocks[k - 1].register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
             for k in sorted(set(layers))]
    try:
        model.features(x, t, y, depth=max(layers))
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def normalise(tokens, baseline):
    """tokens (N, T, D) -> (N, T, D), prepared for the PCA as the released pca-vis does: for SRA checkpoints
    each token goes through a LayerNorm without affine parameters (eps 1e-6); for original SiT checkpoints
    each channel is min-max scaled over the tokens, (x - min) / (max - min + 1e-6)."""
    if baseline:
        low, high = tokens.amin(dim=1, keepdim=True), tokens.amax(dim=1, keepdim=True)
        return (tokens - low) / (high - low + 1e-6)
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)


@torch.no_grad()
def layer_features(model, x_t, t, label, layers, baseline):
    """{K: normalised tokens (N, T, D) after block K} for x_t (N, 4, h, w) at model times t (N,)."""
    y = torch.full((len(x_t),), label, dtype=torch.long, device=x_t.device)
    features = extract_features(model, x_t, t.to(x_t.device), y, layers)
    return {k: normalise(tokens, baseline) for k, tokens in features.items()}


def pca_rgb(tokens, thr=0.0):
    """tokens (T, D) -> float (h, w, 3) in [0, 1] with h = w = sqrt(T): the first 3 principal components.

    Tokens are centered; each component's sign is fixed so that its largest-magnitude loading is positive
    (sklearn's PCA convention); each component is min-maxed over the tokens. Tokens whose first
    component is below thr become black.
    """
    tokens = tokens.detach().double().cpu()
    num_tokens = tokens.shape[0]
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    centered = tokens - tokens.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[:3]
    largest = components.abs().argmax(dim=1)
    components = components * torch.sign(components[torch.arange(len(components)), largest])[:, None]
    scores = torch.zeros(num_tokens, 3, dtype=torch.float64)
    scores[:, :len(components)] = centered @ components.T
    low, high = scores.min(dim=0).values, scores.max(dim=0).values
    rgb = (scores - low) / (high - low).clamp_min(1e-12)
    rgb[rgb[:, 0] < thr] = 0
    return rgb.reshape(side, side, 3).numpy()


def grid_size(rows, cols):
    """(width, height) in pixels of a grid of rows x cols tiles with its labels."""
    return LABEL_W + cols * (TILE + GAP), LABEL_H + rows * (TILE + GAP)


def compose_grid(pixels, maps, times, layers):
    """The output PNG: the input image in the first row's first column, then maps[i][j] (h, w, 3) in [0, 1]
    for time i and layer j, upsampled with nearest to TILE x TILE; labels 't=...' and 'layer K'."""
    canvas = Image.new("RGB", grid_size(len(times), 1 + len(layers)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_SIZE)

    def cell(row, col):
        return LABEL_W + col * (TILE + GAP), LABEL_H + row * (TILE + GAP)

    canvas.paste(Image.fromarray(pixels).resize((TILE, TILE), Image.BICUBIC), cell(0, 0))
    for col, name in enumerate(["input"] + [f"layer {k}" for k in layers]):
        x, _ = cell(0, col)
        draw.text((x + TILE // 2, LABEL_H // 2), name, fill="black", font=font, anchor="mm")
    for row, t in enumerate(times):
        _, y = cell(row, 0)
        draw.text((LABEL_W // 2, y + TILE // 2), f"t={t:g}", fill="black", font=font, anchor="mm")
        for col, rgb in enumerate(maps[row], start=1):
            tile = Image.fromarray(np.round(rgb * 255).astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
            canvas.paste(tile, cell(row, col))
    return canvas


def build_model(args, device):
    """The EMA model of --ckpt, in eval mode; tells SRA and original SiT checkpoints apart.
    Checkpoints trained with --qk-norm are recognised by their q_norm weights. Fused attention only for --baseline,
    as released."""
    ckpt = load_checkpoint(checkpoint_file(args.ckpt), "--ckpt")
    state = model_state_dict(ckpt)
    del ckpt  # frees the training weights and optimizer state of a training checkpoint
    has_ap_head = any(k.startswith("ap_head.") for k in state)
    if args.baseline and has_ap_head:
        raise UserError(f"--ckpt {args.ckpt} has an ap_head: this is an SRA checkpoint, drop --baseline")
    if not args.baseline and not has_ap_head and learns_sigma(state):
        raise UserError(f"--ckpt {args.ckpt} has no ap_head and 8 output channels: an original SiT checkpoint, "
                        "pass --baseline")
    qk_norm = any(".attn.q_norm." in k for k in state)
    try:
        # Attention as the released pca-vis computed it: its SRA model turned timm's fused kernel off, its original
        # SiT model kept timm's default (fused). The same attention up to float rounding.
        model = SiT_models[args.model](input_size=args.resolution // 8, num_classes=args.num_classes,
                                       class_dropout_prob=0.1, learn_sigma=args.baseline, qk_norm=qk_norm,
                                       fused_attn=args.baseline)
    except ValueError as e:
        raise UserError(f"--model {args.model} --resolution {args.resolution}: {e}") from None
    if args.baseline:  # original SiT has no SRA head; features() never uses it, so keep the fresh one
        state = with_own_head(model, state)
    hint = f"--model {args.model} --resolution {args.resolution} --num-classes {args.num_classes}"
    load_weights(model, state, f"--ckpt {args.ckpt}", hint + (" --baseline" if args.baseline else ""))
    return model.to(device).eval().requires_grad_(False)


def main(argv=None):
    args = parse_args(argv)
    for t in args.times:
        if not 0 <= t <= 1:
            raise UserError(f"--times {t} is outside [0, 1]")
    if not 0 <= args.label_id <= args.num_classes:
        raise UserError(f"--label_id {args.label_id} is outside 0..{args.num_classes} ({args.num_classes}: unconditional)")
    if not 0 <= args.thr <= 1:
        raise UserError(f"--thr {args.thr} is outside [0, 1]")
    if not args.legacy and not args.baseline:
        raise UserError("--no-legacy changes the time given to an original SiT checkpoint: pass it with --baseline")
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} is not a positive multiple of 8 (the VAE's downsampling)")
    save_path = Path(args.save_path) if args.save_path else Path(args.ckpt).with_name(f"{Path(args.ckpt).stem}-pca.png")
    if save_path.suffix.lower() != ".png":
        raise UserError(f"--save_path {save_path}: the output is a PNG, name it *.png")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    check_writable(save_path.parent, "--save_path")
    pixels = load_image(args.img_path, args.resolution, args.center_crop)
    model = build_model(args, device)
    for k in args.layers:
        if not 1 <= k <= model.depth:
            raise UserError(f"--layers {k} is outside 1..{model.depth}, the depth of {args.model}")

    vae = load_vae(args.vae, device)
    x_t = noisy_latents(*posterior(vae, pixels), args.times, torch.Generator().manual_seed(args.seed))
    features = layer_features(model, x_t.to(device), model_times(args.times, args.baseline, args.legacy),
                              args.label_id, args.layers, args.baseline)
    maps = [[pca_rgb(features[k][i], args.thr) for k in args.layers] for i in range(len(args.times))]
    compose_grid(pixels, maps, args.times, args.layers).save(save_path)
    print(f"saved {save_path}")


if __name__ == "__main__":
    run_main(main)
