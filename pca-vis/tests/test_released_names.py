"""A released checkpoint's name as --ckpt: the model and resolution it sets, and one line when the hub cannot serve
it. A module of its own: the unreachable hub spends about 25 s in huggingface_hub's retry waits, which pytest-xdist
overlaps with test_cli.py's work on the other core."""
import pytest
from conftest import MODEL, TINY, run_script

from main_pca import parse_args


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_a_released_name_the_hub_cannot_serve_is_one_line_with_the_url(hub, tiny_vae_dir, tmp_path):
    """An empty private cache, offline (HF_HUB_OFFLINE=1) or online with the hub at a closed loopback port (after
    huggingface_hub's retries, about 25 s)."""
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    if hub == "unreachable":
        env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    result = run_script("main_pca.py", "--ckpt", "sitxl-sra-res512-ep400.pt", "--save_path", str(tmp_path / "o.png"),
                        "--vae", str(tiny_vae_dir), *TINY, check=False, env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --ckpt sitxl-sra-res512-ep400.pt: cannot download "
                                    "https://huggingface.co/DyJiang/SRA/resolve/main/sitxl-sra-res512-ep400.pt (")
    assert result.stderr.endswith("; download it by hand and pass --ckpt PATH\n")


@pytest.mark.parametrize("name, resolution", [("sitxl-sra-res256-ep800.pt", 256), ("sitxl-sra-res512-ep400.pt", 512)])
def test_a_released_name_sets_the_model_and_resolution_unless_given(name, resolution):
    assert (parse_args(["--ckpt", name]).model, parse_args(["--ckpt", f"some/{name}"]).resolution) == (
        "SiT-XL/2", resolution)
    assert parse_args(["--ckpt", name, "--resolution", "64", "--model", MODEL]).resolution == 64
    assert (parse_args(["--ckpt", "mine.pt"]).model, parse_args(["--ckpt", "mine.pt"]).resolution) == ("SiT-XL/2", 256)
