"""train.py end to end on a tiny dataset in the real format: outputs (SiT's sample grid too),
2 processes, exact resume after SIGKILL / SIGTERM, crash-safe checkpoints, non-finite losses,
trackers, the EMA decay and one-line input errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILY, MODELS, TINY_MODEL, TREE, run_script, write_latent_dataset

from utils import load_checkpoint

TINY = ["--model", TINY_MODEL, "--resolution", "32", "--num-classes", "10", "--batch-size", "4",
        "--mixed-precision", "no", "--block-out-s", "2", "--block-out-t", "4", "--num-workers", "0",
        "--log-every", "2", *(["--sample-steps", "0"] if FAMILY == "SiT" else [])]


def train_args(out, data, *extra):
    return ["train.py", *TINY, "--output-dir", str(out), "--exp-name", "exp", "--data-dir", str(data), *extra]


def checkpoint(out, name):
    return load_checkpoint(Path(out) / "exp" / "checkpoints" / name)


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"optimizer {k} differs"
    assert (a["steps"], a["epoch"], a["batch_in_epoch"]) == (b["steps"], b["epoch"], b["batch_in_epoch"])


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


DIST_ENV = {"ACCELERATE_USE_CPU": "true"}


def torchrun(*argv):
    return ["torchrun", "--standalone", "--nproc_per_node", "2", *argv]


def test_two_processes_train_and_resume_exactly(tmp_path, latent_data_dir):
    full, split = tmp_path / "full", tmp_path / "split"
    run_script(*torchrun(*train_args(full, latent_data_dir, "--max-train-steps", "5", "--batch-size", "2")),
               env=DIST_ENV)
    run_script(*torchrun(*train_args(split, latent_data_dir, "--max-train-steps", "2", "--batch-size", "2")),
               env=DIST_ENV)
    run_script(*torchrun(*train_args(split, latent_data_dir, "--max-train-steps", "5", "--batch-size", "2",
                                     "--resume-ckpt", "latest")), env=DIST_ENV)
    a, b = checkpoint(full, "step-5.pt"), checkpoint(split, "step-5.pt")
    assert len(a["rng"]) == 2
    assert_same_state(a, b)
    assert loss_log(full) == loss_log(split)


def test_torchrun_without_cpu_flag_is_refused(tmp_path, latent_data_dir):
    result = run_script(*torchrun(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "1")), check=False)
    assert result.returncode != 0
    assert "WORLD_SIZE=2 but accelerate runs 1 process(es)" in result.stderr


def start_training(out, data, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *train_args(out, data, *extra)], cwd=TREE, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(out, proc, timeout=120):
    latest = Path(out) / "exp" / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while not latest.exists():
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{proc.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.02)


RESUME_STEPS = ["--max-train-steps", "14", "--checkpoint-steps", "3"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, latent_data_dir):
    """The output folder of one run of RESUME_STEPS that nothing interrupts."""
    full = tmp_path_factory.mktemp("full")
    run_script(*train_args(full, latent_data_dir, *RESUME_STEPS))
    return full


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_bit_identically(tmp_path, latent_data_dir, uninterrupted_run, how):
    full, broken, steps = uninterrupted_run, tmp_path / "broken", RESUME_STEPS
    proc = start_training(broken, latent_data_dir, *steps)
    wait_for_checkpoint(broken, proc)
    proc.send_signal(getattr(signal, how))
    output = proc.communicate(timeout=120)[0]
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0 and "resume with --resume-ckpt latest" in output
    interrupted_at = checkpoint(broken, (broken / "exp/checkpoints/latest").read_text())["steps"]
    assert interrupted_at < 14, "the run finished before it was interrupted; the test proves nothing"
    run_script(*train_args(broken, latent_data_dir, *steps, "--resume-ckpt", "latest"))
    assert_same_state(checkpoint(full, "step-14.pt"), checkpoint(broken, "step-14.pt"))
    assert loss_log(full) == loss_log(broken)


def test_checkpoint_save_killed_mid_write_leaves_the_previous_one(tmp_path):
    target = tmp_path / "step-1.pt"
    torch.save({"steps": 1}, target)
    script = ("import sys, torch; sys.path.insert(0, '.'); from utils import save_atomic; "
              f"save_atomic({{'steps': 2, 'w': torch.zeros(300_000_000, dtype=torch.uint8)}}, {str(target)!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=TREE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".step-1.pt.*.tmp")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert load_checkpoint(target) == {"steps": 1}


def test_keep_last_prunes_old_step_checkpoints(tmp_path, latent_data_dir):
    run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "8", "--checkpoint-steps", "2",
                           "--keep-last", "2"))
    names = sorted(p.name for p in (tmp_path / "exp" / "checkpoints").glob("*.pt"))
    assert names == ["step-6.pt", "step-8.pt"]


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


def test_direct_call_defaults_are_the_released_train_py():
    import train
    args = train.parse_args(["--exp-name", "e", "--data-dir", "d"])
    assert (args.loss_type, args.block_out_s, args.block_out_t, args.t_max, args.cfg_prob, args.num_workers,
            args.max_train_steps, args.epochs, args.checkpoint_steps, args.checkpoint_epochs, args.batch_size,
            args.learning_rate, args.mixed_precision, args.max_grad_norm, args.ema_decay) == (
        {"SiT": "cos", "DiT": "sml1"}[FAMILY], 4, 8, 0.2, 0.1, 8, 4_100_000, 801, 50_000, 200, 32, 1e-4, "fp16", 1.0,
        0.9999)
    assert train.parse_args(["--exp-name", "e", "--data-dir", "d", "--local-rank=1"]).local_rank == 1


def test_tf32_is_enabled_as_in_the_released_train_py(tmp_path, latent_data_dir):
    code = ("import sys, torch, train; torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False; "
            "train.main(train.parse_args(sys.argv[1:])); "
            "print('tf32', torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)")
    result = run_script("-c", code, *train_args(tmp_path, latent_data_dir, "--max-train-steps", "1")[1:])
    assert "tf32 True True" in result.stdout


def released_checkpoint(path, steps, epoch):
    """What the released train.py saves: a plain (non-fused) AdamW's state, args as an argparse.Namespace, the epoch
    and step counter, and no RNG state or data position."""
    import argparse
    import copy

    torch.manual_seed(0)
    model = MODELS[TINY_MODEL](input_size=4, num_classes=10)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = torch.rand(4) if FAMILY == "SiT" else torch.randint(0, 1000, (4,))
    x, y = torch.randn(4, 4, 4, 4), torch.randint(0, 10, (4,))
    for _ in range(steps):
        (model(x, t, y)[:, :4] - x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    args = argparse.Namespace(model=TINY_MODEL, resolution=32, num_classes=10, loss_type="sml1")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(), "args": args,
                "epoch": epoch, "steps": steps}, path)


def test_a_checkpoint_of_the_released_code_resumes(tmp_path, latent_data_dir):
    released = tmp_path / "released.pt"
    released_checkpoint(released, steps=3, epoch=2)
    result = run_script(*train_args(tmp_path, latent_data_dir, "--resume-ckpt", str(released), "--max-train-steps",
                                    "5", "--checkpoint-steps", "1"))
    assert "holds no RNG state or data position" in result.stdout + result.stderr
    names = sorted(p.name for p in (tmp_path / "exp" / "checkpoints").glob("step-*.pt"))
    assert names == ["step-4.pt", "step-5.pt"]
    last = checkpoint(tmp_path, "step-5.pt")
    assert (last["steps"], last["epoch"], last["batch_in_epoch"]) == (5, 2, 2)  # epoch 2 continued from its start
    saved = load_checkpoint(released)["opt"]["state"]
    assert saved and all(last["opt"]["state"][i]["step"].item() == 3 + 2 for i in saved)  # the file's moments went on
    assert last["opt"]["param_groups"][0]["fused"] is True
