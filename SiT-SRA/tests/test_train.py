"""train.py end to end on a tiny dataset in the real format: outputs (SiT's sample grid too), non-finite
losses, trackers, the EMA decay, the released defaults and one-line input errors. Resuming and checkpoints:
test_train_resume.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY, MODELS, TINY_MODEL, run_script, write_latent_dataset

from utils import load_checkpoint

TINY = ["--model", TINY_MODEL, "--resolution", "32", "--num-classes", "10", "--batch-size", "4",
        "--mixed-precision", "no", "--block-out-s", "2", "--block-out-t", "4", "--num-workers", "0",
        "--log-every", "2", *(["--sample-steps", "0"] if FAMILY == "SiT" else [])]


def train_args(out, data, *extra):
    return ["train.py", *TINY, "--output-dir", str(out), "--exp-name", "exp", "--data-dir", str(data), *extra]


def checkpoint(out, name):
    return load_checkpoint(Path(out) / "exp" / "checkpoints" / name)


def loss_log(out):
    return (Path(out) / "exp" / "losses.jsonl").read_text()


def test_one_process_end_to_end(tmp_path, latent_data_dir, tiny_vae_dir):
    grid = ["--sample-steps", "7", "--vae", str(tiny_vae_dir)] if FAMILY == "SiT" else []  # DiT draws no grid
    run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "7", *grid))
    exp = tmp_path / "exp"
    assert (exp / "args.json").is_file() and (exp / "log.txt").is_file()
    ckpt = checkpoint(tmp_path, "step-7.pt")
    assert {"model", "ema", "opt", "args", "epoch", "steps"} <= ckpt.keys()
    assert ckpt["steps"] == 7 and ckpt["epoch"] == 1 and ckpt["args"].model == TINY_MODEL
    assert (exp / "checkpoints" / "latest").read_text() == "step-7.pt"
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["ema"])
    records = [json.loads(line) for line in loss_log(tmp_path).splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8))
    assert all(np.isfinite([r["loss"], r["align_loss"], r["grad_norm"]]).all() for r in records)
    if FAMILY == "SiT":
        from PIL import Image
        assert Image.open(exp / "samples" / "step-7.png").size == (8 * 32, 8 * 32)


def test_ema_moves_by_its_decay_after_every_step(tmp_path, latent_data_dir):
    run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "2", "--checkpoint-steps", "1",
                           "--ema-decay", "0.75"))
    one, two = checkpoint(tmp_path, "step-1.pt"), checkpoint(tmp_path, "step-2.pt")
    assert any(not torch.equal(one["model"][k], two["model"][k]) for k in two["model"])  # the model moved
    for k in two["ema"]:  # ema_2 = decay * ema_1 + (1 - decay) * model_2
        torch.testing.assert_close(two["ema"][k], 0.75 * one["ema"][k] + 0.25 * two["model"][k], rtol=1e-5, atol=1e-7)


def test_no_sra_baseline_trains_without_alignment(tmp_path, latent_data_dir):
    run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "3", "--no-sra"))
    records = [json.loads(line) for line in loss_log(tmp_path).splitlines()]
    assert all(r["align_loss"] == 0 for r in records) and all(r["loss"] > 0 for r in records)


def nan_dataset(root):
    data = write_latent_dataset(root, num_items=24, resolution=32, num_classes=10)
    bad = data / "vae-sd" / "00000" / "img-mean-std-00000005.npy"
    moments = np.load(bad)
    moments[0, 0, 0] = np.nan
    np.save(bad, moments)
    return data


def test_nonfinite_loss_stops_naming_the_step_and_saves_nothing_corrupted(tmp_path):
    data = nan_dataset(tmp_path / "data")
    result = run_script(*train_args(tmp_path, data, "--max-train-steps", "6", "--checkpoint-steps", "1"),
                        check=False)
    assert result.returncode == 2
    assert "error: non-finite loss at step" in result.stderr and "denoising loss nan" in result.stderr
    assert "Traceback" not in result.stderr
    for path in (tmp_path / "exp" / "checkpoints").glob("*.pt"):
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values()), path


def test_skip_nonfinite_skips_the_bad_update(tmp_path):
    data = nan_dataset(tmp_path / "data")
    run_script(*train_args(tmp_path, data, "--max-train-steps", "6", "--skip-nonfinite", "2"))
    ckpt = checkpoint(tmp_path, "step-6.pt")
    assert all(torch.isfinite(v).all() for key in ("model", "ema") for v in ckpt[key].values())
    assert ckpt["nonfinite_skipped"] == 1


def write_labels(data, transform):
    index = data / "vae-sd" / "dataset.json"
    labels = json.loads(index.read_text())["labels"]
    index.write_text(json.dumps({"labels": transform(labels)}))


@pytest.mark.parametrize("case, extra, message", [
    ("no vae-sd", [], "missing {data}/vae-sd/dataset.json"),
    ("wrong shape", ["--resolution", "64"], "latent shape (8, 4, 4), expected (8, 8, 8) for --resolution 64"),
    ("label out of range", ["--num-classes", "3"], "is outside 0..2 (--num-classes 3)"),
    ("too few items", ["--batch-size", "32"], "24 items, fewer than one global batch of 32"),
    ("empty", [], "the dataset is empty"),
    ("student deeper", ["--block-out-s", "4", "--block-out-t", "3"], "--block-out-s 4 must be shallower"),
    ("teacher too deep", ["--block-out-t", "7"], f"--block-out-t 7 is outside 1..6, the depth of {TINY_MODEL}"),
    ("unknown model", ["--model", f"{FAMILY}-Q/2"], f"invalid choice: '{FAMILY}-Q/2'"),
    ("zero period", ["--checkpoint-steps", "0"], "argument --checkpoint-steps: expected an integer >= 1, got 0"),
    ("other architecture", ["--resume-ckpt", "{other}"], f"is another architecture than --model {TINY_MODEL}"),
    ("unwritable", ["--output-dir", "/proc/forbidden"], "--output-dir /proc/forbidden"),
])
def test_input_errors_are_one_line_and_touch_nothing(tmp_path, latent_data_dir, case, extra, message):
    data = tmp_path / "data"
    if case == "no vae-sd":
        data.mkdir()
    else:
        write_latent_dataset(data, num_items=24, resolution=32, num_classes=10)
    if case == "empty":
        write_labels(data, lambda labels: [])
    if case == "label out of range":
        write_labels(data, lambda labels: [[name, 2 + i % 2] for i, (name, _) in enumerate(labels)])
    other = tmp_path / "other.pt"
    if case == "other architecture":
        state = MODELS[f"{FAMILY}-S/2"](input_size=4, num_classes=10).state_dict()
        torch.save({"model": state, "ema": state, "opt": {}, "steps": 0, "epoch": 0}, other)
    existing = tmp_path / "exp" / "checkpoints"
    existing.mkdir(parents=True)
    (existing / "step-1.pt").write_bytes(b"previous run")
    before = {p: p.read_bytes() for p in (tmp_path / "exp").rglob("*") if p.is_file()}
    extra = [e.format(other=other) for e in extra]
    result = run_script(*train_args(tmp_path, data, "--max-train-steps", "1", *extra), check=False)
    assert result.returncode == 2
    assert message.format(data=data) in result.stderr
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_wandb_tracker_logs_offline(tmp_path, latent_data_dir):
    run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "2", "--report-to", "wandb"),
               env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_ema_decay_zero_makes_the_ema_follow_the_model(tmp_path, latent_data_dir):
    run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "2", "--ema-decay", "0"))
    ckpt = checkpoint(tmp_path, "step-2.pt")
    for k in ckpt["ema"]:
        assert torch.equal(ckpt["ema"][k], ckpt["model"][k]), k


# The released train.py's defaults (train.py's flags there: SiT-SRA/ and DiT-SRA/ of the released code).
RELEASED_DEFAULTS = {
    "loss_type": {"SiT": "cos", "DiT": "sml1"}[FAMILY], "block_out_s": 4, "block_out_t": 8,
    "t_max": {"SiT": 0.2, "DiT": 0.1}[FAMILY], "cfg_prob": 0.1, "num_workers": 8, "max_train_steps": 4_100_000,
    "epochs": 801, "checkpoint_steps": 50_000, "checkpoint_epochs": 200, "batch_size": 32, "learning_rate": 1e-4,
    "mixed_precision": "fp16", "max_grad_norm": 1.0, "gradient_accumulation_steps": 1, "seed": 0,
    "adam_weight_decay": 0.0, "fused_attn": True, "qk_norm": False, "num_classes": 1000, "resolution": 256,
    "tf32": FAMILY == "SiT",  # the released SiT train.py turns TF32 matmuls on; DiT's never does
}
# Where ours differs on purpose (README, "Differences from the released code"): DiT's --t-max is its README's 0.2.
OUR_DIFFERENCES = {"SiT": {}, "DiT": {"t_max": 0.2}}[FAMILY]


def test_direct_call_defaults_are_the_released_ones_but_the_documented_differences():
    import train
    args = vars(train.parse_args(["--exp-name", "e", "--data-dir", "d"]))
    expected = {**RELEASED_DEFAULTS, **OUR_DIFFERENCES}
    assert {name: args[name] for name in expected} == expected
    assert args["ema_decay"] == 0.9999  # the released update_ema's decay
    assert train.parse_args(["--exp-name", "e", "--data-dir", "d", "--local-rank=1"]).local_rank == 1


@pytest.mark.parametrize("flag", [[], ["--tf32"], ["--no-tf32"]])
def test_tf32_matmuls_follow_the_flag_and_cudnn_keeps_its_setting(tmp_path, latent_data_dir, flag):
    """Without the flag, TF32 matmuls are as in the released train.py (SiT on, DiT off); cuDNN is left alone."""
    expected = {"--tf32": True, "--no-tf32": False}[flag[0]] if flag else RELEASED_DEFAULTS["tf32"]
    code = (f"import sys, torch, train; torch.backends.cuda.matmul.allow_tf32 = {not expected}; "
            "torch.backends.cudnn.allow_tf32 = False; train.main(train.parse_args(sys.argv[1:])); "
            "print('tf32', torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)")
    result = run_script("-c", code, *train_args(tmp_path, latent_data_dir, "--max-train-steps", "1", *flag)[1:])
    assert f"tf32 {expected} False" in result.stdout


def test_teacher_fp32_reaches_the_loss(tmp_path, latent_data_dir):
    """Under bf16 autocast, --teacher-fp32 changes only the teacher's rounding: the first step's alignment loss moves a
    little, its denoising loss (the same draws, the same student) not at all. (test_loss.py checks the teacher's
    features themselves.)"""
    first = {}
    for name, flags in (("autocast", []), ("fp32", ["--teacher-fp32"])):
        run_script(*train_args(tmp_path / name, latent_data_dir, "--max-train-steps", "1", "--mixed-precision", "bf16",
                               *flags))
        first[name] = json.loads(loss_log(tmp_path / name).splitlines()[0])
    assert first["fp32"]["loss"] == first["autocast"]["loss"]
    assert first["fp32"]["align_loss"] != first["autocast"]["align_loss"]
    assert first["fp32"]["align_loss"] == pytest.approx(first["autocast"]["align_loss"], rel=0.05)
