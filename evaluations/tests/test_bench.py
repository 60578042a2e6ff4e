"""The two timing scripts the GPU check runs, on the CPU at tiny sizes: one line with the figure, and one-line
errors for a bad --device."""
import os
import re
import subprocess
import sys

import pytest
from conftest import TREE


def run_script(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=TREE.parent, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bench_precision_recall_prints_one_line_with_the_seconds_and_figures():
    result = run_script("evaluations/bench_precision_recall.py", "--device", "cpu", "--ref", "40", "--samples", "30",
                        "--dim", "64", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"precision/recall 40 x 30 x 64 on cpu \(\d+ CPU threads\): \d+\.\d{3} s "
                        r"\(precision 0\.\d{4}, recall 0\.\d{4}\)\n", result.stdout), result.stdout


def test_bench_inception_with_random_weights_prints_images_per_second():
    result = run_script("evaluations/bench_inception.py", "--device", "cpu", "--random-weights", "--batch-size", "1",
                        "--batches", "1", "--resolution", "16")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"Inception pass on cpu \(\d+ CPU threads, batch 1, 16 px, random weights\): "
                        r"\d+\.\d\d images/s\n", result.stdout), result.stdout


@pytest.mark.parametrize("script", ["bench_precision_recall.py", "bench_inception.py"])
@pytest.mark.parametrize("device, message", [("tpu9", "--device tpu9: not a device"),
                                             ("cuda", "--device cuda: CUDA is not available here")])
def test_a_bad_device_is_one_line(script, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_script(f"evaluations/{script}", "--device", device)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.startswith(f"error: {message}")
    assert result.stderr.count("\n") == 1
