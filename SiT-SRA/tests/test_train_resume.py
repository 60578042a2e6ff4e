"""train.py's checkpoints and resuming: 2 processes, exact resume after SIGKILL / SIGTERM, crash-safe saves,
pruning, and a checkpoint of the released code. Apart from test_train.py so that the two files run in parallel."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILY, MODELS, TINY_MODEL, TREE, run_script
from test_train import checkpoint, loss_log, train_args

from utils import load_checkpoint


def assert_same_state(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"optimizer {k} differs"
    assert (a["steps"], a["epoch"], a["batch_in_epoch"]) == (b["steps"], b["epoch"], b["batch_in_epoch"])


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
