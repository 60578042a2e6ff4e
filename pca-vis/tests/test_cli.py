"""main_pca.py end to end in subprocesses (the PNG grid, its defaults, the original-SiT baseline) and its
one-line errors."""
import numpy as np
import pytest
import torch
from conftest import LATENT, MODEL, NUM_CLASSES, TINY, run_script, serve_from_offline_hub
from PIL import Image

from main_pca import (DEFAULT_IMAGE, GAP, LABEL_H, LABEL_W, TILE, SiT_models, UserError, build_model, main,
                      parse_args)

TIMES, LAYERS = ["0.7", "0.2"], ["1", "6", "12"]
TOKENS_PER_SIDE = 4  # --resolution 64 -> latent 8 -> 4 x 4 patches of SiT-S/2


def cell(png, row, col):
    """The TILE x TILE cell of (row, col) of a grid; column 0 is the input image."""
    y, x = LABEL_H + row * (TILE + GAP), LABEL_W + col * (TILE + GAP)
    return png[y:y + TILE, x:x + TILE]


@pytest.fixture(scope="module")
def grid_png(tmp_path_factory, sra_ckpt, tiny_vae_dir):
    out = tmp_path_factory.mktemp("grid") / "grid.png"
    result = run_script("main_pca.py", "--ckpt", str(sra_ckpt), "--baseline=False", "--img_path", str(DEFAULT_IMAGE),
                        "--save_path", str(out), "--vae", str(tiny_vae_dir), "--times", *TIMES, "--layers", *LAYERS,
                        *TINY)
    assert result.stdout.strip().splitlines()[-1] == f"saved {out}"
    return np.asarray(Image.open(out))


def test_grid_layout_and_tiles(grid_png):
    rows, cols = len(TIMES), 1 + len(LAYERS)
    assert grid_png.shape == (LABEL_H + rows * (TILE + GAP), LABEL_W + cols * (TILE + GAP), 3)
    for row in range(rows):
        for col in range(1, cols):
            tile = cell(grid_png, row, col)
            # the token grid upsampled with nearest: constant blocks of TILE / 4 pixels
            blocks = tile.reshape(TOKENS_PER_SIDE, TILE // TOKENS_PER_SIDE, TOKENS_PER_SIDE, -1, 3)
            assert (blocks == blocks[:, :1, :, :1]).all()
            # each map is its own PCA, each component min-maxed over the tokens to [0, 1]
            pixels = tile.reshape(-1, 3)
            assert pixels.min(0).tolist() == [0, 0, 0] and pixels.max(0).tolist() == [255, 255, 255]
    assert not (cell(grid_png, 0, 1) == cell(grid_png, 0, 2)).all()  # layers differ
    assert not (cell(grid_png, 0, 3) == cell(grid_png, 1, 3)).all()  # times differ
    assert len(np.unique(cell(grid_png, 0, 0).reshape(-1, 3), axis=0)) > 100  # the input image
    assert (cell(grid_png, 1, 0) == 255).all()  # shown once
    assert (grid_png[:LABEL_H, LABEL_W:] < 100).any() and (grid_png[LABEL_H:, :LABEL_W] < 100).any()  # labels


def test_defaults_image_and_save_path_next_to_the_checkpoint(grid_png, sra_ckpt, tiny_vae_dir):
    """Without --img_path and --save_path: assets/default.png, written to <ckpt stem>-pca.png; same seed,
    same figure."""
    out = sra_ckpt.with_name(f"{sra_ckpt.stem}-pca.png")
    result = run_script("main_pca.py", "--ckpt", str(sra_ckpt), "--vae", str(tiny_vae_dir), "--times", *TIMES,
                        "--layers", *LAYERS, *TINY)
    assert result.stdout.strip().splitlines()[-1] == f"saved {out}"
    np.testing.assert_array_equal(np.asarray(Image.open(out)), grid_png)


def test_baseline_runs_an_original_sit_checkpoint_with_threshold(sit_ckpt, tiny_vae_dir, tmp_path):
    """--thr 0.5 draws black exactly the tokens whose first component is below 0.5 in the same figure without a
    threshold (pixel value <= 127 there: round(255 c) <= 127 if and only if c < 0.5), and leaves the others as they are."""
    pngs = {}
    for thr in ("0.5", "0"):
        out = tmp_path / f"baseline-{thr}.png"
        run_script("main_pca.py", "--ckpt", str(sit_ckpt), "--baseline", "--save_path", str(out),
                   "--vae", str(tiny_vae_dir), "--times", "0.5", "--layers", "3", "12", "--thr", thr, *TINY)
        pngs[thr] = np.asarray(Image.open(out))
    assert pngs["0.5"].shape == (LABEL_H + TILE + GAP, LABEL_W + 3 * (TILE + GAP), 3)
    step = TILE // TOKENS_PER_SIDE
    for col in (1, 2):
        cut, full = (cell(pngs[thr], 0, col)[::step, ::step].reshape(-1, 3) for thr in ("0.5", "0"))
        background = full[:, 0] <= 127
        assert 0 < background.sum() < len(full)
        assert (cut[background] == 0).all()
        np.testing.assert_array_equal(cut[~background], full[~background])


def test_a_released_name_draws_the_checkpoint_the_hub_cache_holds_under_it(grid_png, sra_ckpt, tiny_vae_dir, tmp_path):
    """--ckpt sitxl-sra-res256-ep800.pt, no such file: the checkpoint a private offline hub cache serves under that
    name draws the grid of the same file passed by path."""
    name, out = "sitxl-sra-res256-ep800.pt", tmp_path / "by-name.png"
    env = serve_from_offline_hub(tmp_path / "hub", "DyJiang/SRA", name, sra_ckpt)
    run_script("main_pca.py", "--ckpt", name, "--img_path", str(DEFAULT_IMAGE), "--save_path", str(out),
               "--vae", str(tiny_vae_dir), "--times", *TIMES, "--layers", *LAYERS, *TINY, env=env)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), grid_png)


def test_sra_checkpoint_with_baseline_exits_2_with_one_line(sra_ckpt, tiny_vae_dir):
    result = run_script("main_pca.py", "--ckpt", str(sra_ckpt), "--baseline=True", "--vae", str(tiny_vae_dir), *TINY,
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --ckpt {sra_ckpt} has an ap_head: this is an SRA checkpoint, "
                                     "drop --baseline")


def test_original_sit_checkpoint_without_baseline_is_an_error(sit_ckpt):
    with pytest.raises(UserError, match="no ap_head and 8 output channels: an original SiT checkpoint, pass --baseline"):
        main(["--ckpt", str(sit_ckpt), *TINY])


@pytest.mark.parametrize("flags, message", [
    (["--layers", "4", "13"], r"--layers 13 is outside 1\.\.12, the depth of SiT-S/2"),
    (["--layers", "0"], r"--layers 0 is outside 1\.\.12"),
    (["--img_path", "missing.png"], "--img_path missing.png: no such file"),
    (["--img_path", "main_pca.py"], "--img_path main_pca.py: not a readable image"),
    (["--times", "1.5"], r"--times 1\.5 is outside \[0, 1\]"),
    (["--label_id", "11"], r"--label_id 11 is outside 0\.\.10"),
    (["--save_path", "out.jpg"], "name it \\*.png"),
    (["--resolution", "60"], "not a positive multiple of 8"),
    (["--model", "SiT-B/2"], "is another architecture than --model SiT-B/2"),
    (["--baseline"], "has an ap_head: this is an SRA checkpoint, drop --baseline"),
    (["--no-legacy"], "--no-legacy changes the time given to an original SiT checkpoint: pass it with --baseline"),
])
def test_user_errors(sra_ckpt, flags, message):
    with pytest.raises(UserError, match=message):
        main(["--ckpt", str(sra_ckpt), *TINY, *flags])


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(UserError, match="--ckpt .*nope.pt: no such file"):
        main(["--ckpt", str(tmp_path / "nope.pt"), *TINY])


@pytest.mark.parametrize("flags, expected", [
    ([], False), (["--baseline"], True), (["--baseline=False"], False), (["--baseline=True"], True),
    (["--baseline", "false"], False), (["--baseline=yes"], True),
])
def test_baseline_flag_spellings(flags, expected):
    assert parse_args(["--ckpt", "x.pt", *flags]).baseline is expected


def test_defaults_are_the_released_recipe():
    """sd-vae-ft-mse, the baseline fed t (legacy), the whole image resized without a crop."""
    args = parse_args(["--ckpt", "x.pt"])
    assert (args.vae, args.legacy, args.center_crop) == ("mse", True, False)
    assert parse_args(["--ckpt", "x.pt", "--baseline", "--no-legacy", "--center-crop"]).legacy is False


def test_bad_baseline_value_is_rejected():
    with pytest.raises(SystemExit):
        parse_args(["--ckpt", "x.pt", "--baseline=maybe"])


def test_qk_norm_checkpoint_is_recognised(tmp_path):
    model = SiT_models[MODEL](input_size=LATENT, num_classes=NUM_CLASSES, qk_norm=True)
    torch.save(model.state_dict(), tmp_path / "qk.pt")
    loaded = build_model(parse_args(["--ckpt", str(tmp_path / "qk.pt"), *TINY]), "cpu")
    assert isinstance(loaded.blocks[0].attn.q_norm, torch.nn.LayerNorm)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("baseline", [False, True])
def test_attention_is_fused_only_for_the_baseline_as_released(baseline, sra_ckpt, sit_ckpt):
    loaded = build_model(parse_args(["--ckpt", str(sit_ckpt if baseline else sra_ckpt), *TINY,
                                     *(["--baseline"] if baseline else [])]), "cpu")
    assert [block.attn.fused_attn for block in loaded.blocks] == [baseline] * len(loaded.blocks)
