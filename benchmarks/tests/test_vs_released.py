"""benchmarks/vs_released.sh: the offline Hugging Face cache, the step clock and the table it reads from real runs,
and, when SRA_RELEASED_DIR points at a checkout of the released repository, the whole comparison at tiny settings
on the CPU (SRA_RELEASED_PYTHON: the Python of that code's environment, which has transformers)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BENCHMARKS
from vs_released import markdown_table, offline_hub, summary, write_latents

REPO = BENCHMARKS.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_offline_cache_serves_the_tiny_vae_under_the_released_hub_names(tmp_path):
    env = {**ENV, **offline_hub(tmp_path / "hf")}
    load = ("import sys, torch; from diffusers.models import AutoencoderKL; "
            "vaes = [AutoencoderKL.from_pretrained(n) for n in sys.argv[1:]]; "
            "print(sum(p.numel() for p in vaes[0].parameters()), "
            "all(torch.equal(a, b) for a, b in zip(vaes[0].state_dict().values(), vaes[1].state_dict().values())))")
    result = subprocess.run([sys.executable, "-c", load, "stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    params, same = result.stdout.split()
    assert int(params) < 100_000 and same == "True"  # the tiny VAE (the real one has 83M parameters), under both names
    missing = subprocess.run([sys.executable, "-c", load, "stabilityai/sd-vae-ft-other", "stabilityai/sd-vae-ft-ema"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0  # offline: a name outside the cache is not fetched


def test_step_clock_ticks_once_per_step_of_our_train_py(tmp_path):
    data = write_latents(tmp_path / "data", num_items=8, resolution=32, num_classes=10)
    ticks = tmp_path / "train.ticks"
    subprocess.run([sys.executable, str(BENCHMARKS / "step_clock.py"), str(ticks), "5", "train.py", "--model", "SiT-T/2",
                    "--resolution", "32", "--num-classes", "10", "--batch-size", "2", "--num-workers", "0",
                    "--max-train-steps", "5", "--sample-steps", "0", "--block-out-s", "2", "--block-out-t", "4",
                    "--mixed-precision", "no", "--data-dir-train", str(data), "--output-dir", str(tmp_path / "out"),
                    "--exp-name", "run"], cwd=REPO / "SiT-SRA", env=ENV, check=True, capture_output=True, timeout=600)
    times = np.loadtxt(ticks)
    assert times.shape == (5,) and (np.diff(times) > 0).all()
    median = np.median(np.diff(times)[1:])
    images_per_s, ms, n = summary(ticks, warmup=1, images_per_tick=2)
    assert n == 3 and ms == pytest.approx(1000 * median) and images_per_s == pytest.approx(2 / median)


LOOPS = {
    # train.py: the step bar is created first and ticks at the end of each step; torch.compile shows a bar of
    # its own inside the first step
    "update": "bar = tqdm(total=4)\nfor i in range(4):\n    if i == 0:\n        list(tqdm(range(4)))\n"
              "    time.sleep(0.05)\n    bar.update(1)\n",
    # generate.py: a loop over a tqdm (which calls its own update to redraw) ticks at the start of each batch and
    # at the end of the last
    "iteration": "for i in tqdm(range(4), mininterval=0):\n    if i == 0:\n        list(tqdm(range(4)))\n"
                 "    time.sleep(0.05)\n",
}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_step_clock_times_the_first_bar_created_with_the_total(tmp_path, loop):
    """Bars of another total, a bar of the same total created inside the first step and later bars are left out."""
    script = tmp_path / "loop.py"
    script.write_text("import time\nfrom tqdm import tqdm\nfor _ in tqdm(range(7)):\n    pass\n" + LOOPS[loop]
                      + "for _ in tqdm(range(4)):\n    pass\n")
    ticks = tmp_path / "loop.ticks"
    subprocess.run([sys.executable, str(BENCHMARKS / "step_clock.py"), str(ticks), "4", str(script)], env=ENV,
                   check=True, timeout=60)
    intervals = np.diff(np.loadtxt(ticks))
    assert intervals.shape == ((3,) if loop == "update" else (4,)) and (intervals >= 0.05).all(), intervals


def test_table_gives_the_ratio_to_the_released_run():
    table = markdown_table([("SiT train", [("released", (10.0, 100.0, 5)), ("ours", (25.0, 40.0, 5)),
                                           ("ours --no-compile", "failed, exit 1 (x.log)")]),
                            ("SiT sampling", [("released", "not run: no GPU"), ("ours", (3.0, 300.0, 2))])])
    rows = table.splitlines()
    assert rows[2] == "| SiT train | released | 10.00 | 100.0 ms (median of 5) | 1.00x |"
    assert rows[3] == "|  | ours | 25.00 | 40.0 ms (median of 5) | 2.50x |"
    assert rows[4] == "|  | ours --no-compile | - | failed, exit 1 (x.log) | - |"
    assert rows[6] == "|  | ours | 3.00 | 300.0 ms (median of 2) | - |"


@pytest.mark.skipif(not os.environ.get("SRA_RELEASED_DIR"),
                    reason="SRA_RELEASED_DIR is not set: no checkout of the released repository to run")
def test_vs_released_runs_both_repositories_at_tiny_settings(tmp_path):
    """SiT-B/8 (the released SiT-S models fail: their head is built for width 768) and DiT-S/8 at 256 px, batch 2."""
    released_python = os.environ.get("SRA_RELEASED_PYTHON", sys.executable)
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "vs_released.sh"), os.environ["SRA_RELEASED_DIR"], "--released-python",
         released_python, "--models", "SiT-B/8", "DiT-S/8", "--batch-size", "2", "--train-steps", "5", "--warmup", "1",
         "--mixed-precision", "no", "--num-workers", "0", "--sample-batch", "2", "--sample-batches", "3",
         "--sample-steps", "2", "--workdir", str(tmp_path)], env={**ENV, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    number = r"[0-9.]+ \| [0-9.]+ ms \(median of 3\)"
    for work in ("SiT-B/8 train, 256 px, no, batch 2, blocks 4->8", "DiT-S/8 train, 256 px, no, batch 2, blocks 4->8"):
        assert re.search(rf"^\| {re.escape(work)}, 5 steps \| released \| {number} \| 1\.00x \|\n"
                         rf"\|  \| ours \| {number} \| [0-9.]+x \|$", result.stdout, re.M), result.stdout
    assert re.search(r"^\|  \| ours \| [0-9.]+ \| [0-9.]+ ms \(median of 2\) \| - \|$", result.stdout, re.M)
    assert "not run: the released generate.py asserts a GPU" in result.stdout


def test_budget_spent_leaves_rows_that_say_so(tmp_path):
    """With --budget-s spent before the first run, every row says so and the exit status is 1 (this repository
    stands in for the released one: nothing of it runs)."""
    result = subprocess.run(["bash", str(BENCHMARKS / "vs_released.sh"), str(REPO), "--models", "SiT-B/8",
                             "--batch-size", "1", "--train-steps", "3", "--warmup", "1", "--budget-s", "0", "--workdir",
                             str(tmp_path)], env={**ENV, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| work |" not in line]
    spent = [row for row in rows if "| not run: the --budget-s 0 s were spent |" in row]
    assert len(rows) == 4 and len(spent) == (4 if torch.cuda.is_available() else 3), result.stdout  # on a CPU the
    # released sampler's row says it needs a GPU
