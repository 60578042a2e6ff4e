"""train.py's checkpoints and resuming: 2 processes, exact resume after SIGKILL / SIGTERM, with gradient accumulation
and with fp16's GradScaler, crash-safe saves, pruning, checkpoint names and epochs as the released code writes them,
and a checkpoint of the released code. Apart from test_train.py so that the two files run in parallel."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILY, MODELS, TINY_MODEL, TREE, run_script, shared_behaviour
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
    assert a["scaler"] == b["scaler"]


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


# A script run through utils.run_main with a gloo process group: its main() writes `main`, an atexit handler `atexit`,
# and an object freed in the interpreter's finalization `finalized`, each into the file named by argv[1].
GLOO_RUN = """
import atexit, sys, torch
from utils import UserError, run_main

class FreedInFinalization:
    path = sys.argv[1]

    def __del__(self, open=open, print=print):  # sys.argv and the builtins may be gone by then
        print("finalized", file=open(self.path, "a"))

def main():
    torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[1] + ".store", rank=0, world_size=1)
    print("main", file=open(sys.argv[1], "a"))
    if sys.argv[2] == "error":
        raise UserError("--flag is wrong")

object_freed_in_finalization = FreedInFinalization()
atexit.register(lambda: print("atexit", file=open(sys.argv[1], "a")))
run_main(main)
"""


@shared_behaviour
@pytest.mark.parametrize("outcome", ["finished", "error"])
def test_a_gloo_run_ends_after_its_atexit_handlers_without_the_interpreters_finalization(tmp_path, outcome):
    """torch leaves DDP's gloo process group and its threads alive, and a gloo thread meeting the finalization aborts
    the process (utils.exit_before_finalization): the run exits with its status once its atexit handlers have run."""
    events = tmp_path / "events"
    result = subprocess.run([sys.executable, "-c", GLOO_RUN, str(events), outcome], cwd=TREE, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == (2 if outcome == "error" else 0), result.stderr
    assert events.read_text().split() == ["main", "atexit"]
    assert result.stderr.strip().splitlines()[-1:] == (["error: --flag is wrong"] if outcome == "error" else [])


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


# accelerate makes no GradScaler on a CPU (there its fp16 silently runs in float32). This gives the accelerator, after
# start_run, the GradScaler it makes on a GPU, for the CPU, and turns its autocast on, so that train.py runs the fp16
# path for real: autocast to float16, the scaled backward, unscaling and clipping, GradScaler.step with the fused AdamW,
# the scale's update, and the scaler's state in the checkpoint. growth_interval=2 lets the scale move within a few
# steps (it doubles after every 2 steps with finite gradients).
FP16_ON_CPU = """import sys, torch, train
start_run = train.start_run
def start_run_with_grad_scaler(args, **kwargs):
    accelerator, exp_dir = start_run(args, **kwargs)
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", growth_interval=2), True
    return accelerator, exp_dir
train.start_run = start_run_with_grad_scaler
train.main(train.parse_args(sys.argv[1:]))
"""


def run_fp16(out, data, *extra):
    return run_script("-c", FP16_ON_CPU, *train_args(out, data, "--mixed-precision", "fp16", *extra)[1:])


def test_a_checkpoint_of_the_released_code_resumes_under_fp16(tmp_path, latent_data_dir):
    released = tmp_path / "released.pt"
    released_checkpoint(released, steps=3, epoch=2)
    run_fp16(tmp_path, latent_data_dir, "--resume-ckpt", str(released), "--max-train-steps", "7")
    last = checkpoint(tmp_path, "step-7.pt")
    assert (last["steps"], last["epoch"], last["batch_in_epoch"]) == (7, 2, 4)
    saved = load_checkpoint(released)
    assert all(last["opt"]["state"][i]["step"].item() == 3 + 4 for i in saved["opt"]["state"])
    assert last["opt"]["param_groups"][0]["fused"] is True
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert any(not torch.equal(last["model"][k], saved["model"][k]) for k in saved["model"])
    # The released file holds no scaler: a fresh one (scale 2**16) doubled after steps 2 and 4 of the 4 it ran.
    assert last["scaler"]["scale"] == 2.0 ** 16 * 4 and last["scaler"]["_growth_tracker"] == 0


def test_fp16_run_resumes_exactly_with_its_grad_scaler(tmp_path, latent_data_dir):
    """Stopped at step 3, between two growths of the scale: a resume that started a fresh scaler would end with
    another scale (and another growth count) than the uninterrupted run."""
    full, split = tmp_path / "full", tmp_path / "split"
    run_fp16(full, latent_data_dir, "--max-train-steps", "5")
    run_fp16(split, latent_data_dir, "--max-train-steps", "3")
    run_fp16(split, latent_data_dir, "--max-train-steps", "5", "--resume-ckpt", "latest")
    a, b = checkpoint(full, "step-5.pt"), checkpoint(split, "step-5.pt")
    assert a["scaler"]["scale"] == 2.0 ** 16 * 4 and a["scaler"]["_growth_tracker"] == 1
    assert_same_state(a, b)
    assert loss_log(full) == loss_log(split)


def test_accumulated_steps_never_mix_epochs_and_resume_exactly(tmp_path, latent_data_dir):
    """24 items in batches of 3 are 8 micro-batches an epoch; 3 a step make 2 steps, and the 2 micro-batches left over
    are dropped: step 3 is epoch 1's first 3 batches (spilled over, it would be epoch 0's last 2 and epoch 1's first)."""
    full, split = tmp_path / "full", tmp_path / "split"
    steps = ["--batch-size", "3", "--gradient-accumulation-steps", "3", "--checkpoint-steps", "1"]
    run_script(*train_args(full, latent_data_dir, *steps, "--max-train-steps", "5"))
    positions = [(c["epoch"], c["batch_in_epoch"]) for c in (checkpoint(full, f"step-{n}.pt") for n in range(1, 6))]
    assert positions == [(0, 3), (1, 0), (1, 3), (2, 0), (2, 3)]
    assert [json.loads(line)["epoch"] for line in loss_log(full).splitlines()] == [0, 0, 1, 1, 2]
    run_script(*train_args(split, latent_data_dir, *steps, "--max-train-steps", "3"))
    run_script(*train_args(split, latent_data_dir, *steps, "--max-train-steps", "5", "--resume-ckpt", "latest"))
    assert_same_state(checkpoint(full, "step-5.pt"), checkpoint(split, "step-5.pt"))
    assert loss_log(full) == loss_log(split)


def released_files(steps_per_epoch, epochs, checkpoint_steps, checkpoint_epochs):
    """{name: (epoch, steps)} of the checkpoints the released train.py's loop writes: its control flow, written out."""
    files, steps = {}, 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            if steps % checkpoint_steps == 0 and steps > 0:  # at the top of the loop, before the batch's step
                files[f"step-{steps}.pt"] = (epoch, steps)
            steps += 1
        if (epoch + 1) % checkpoint_epochs == 0:
            files[f"epoch-{epoch}.pt"] = (epoch, steps)
    return files


def test_checkpoints_are_named_and_numbered_as_released_and_an_epoch_checkpoint_resumes(tmp_path, latent_data_dir):
    """6 steps an epoch (24 items, batch 4), 3 epochs, a step checkpoint every 4 steps, an epoch one every 2 epochs:
    step-12.pt falls on the end of epoch 1. Ours also saves the last step (step-18.pt), which the released code does
    not. Resuming epoch-1.pt continues at epoch 2 (the released code would repeat epoch 1) without writing epoch-1.pt
    again, onto the uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    flags = ["--epochs", "3", "--checkpoint-steps", "4", "--checkpoint-epochs", "2"]
    run_script(*train_args(full, latent_data_dir, *flags))
    ours = {p.name: load_checkpoint(p) for p in (full / "exp" / "checkpoints").glob("*.pt")}
    expected = {**released_files(6, 3, 4, 2), "step-18.pt": (3, 18)}
    assert {name: (c["epoch"], c["steps"]) for name, c in ours.items()} == expected
    run_script(*train_args(resumed, latent_data_dir, *flags, "--resume-ckpt", str(full / "exp/checkpoints/epoch-1.pt")))
    assert sorted(p.name for p in (resumed / "exp" / "checkpoints").glob("*.pt")) == ["step-16.pt", "step-18.pt"]
    assert_same_state(ours["step-18.pt"], checkpoint(resumed, "step-18.pt"))
