"""The two timing scripts the GPU check runs, on the CPU at tiny sizes: one line with the figure, and one-line
errors for a bad --device; bench_precision_recall.py beside the suite's own code where SRA_SUITE_DIR (a checkout of
openai/guided-diffusion) and SRA_SUITE_PYTHON (an interpreter with TensorFlow) are set."""
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


def test_bench_precision_recall_names_a_suite_folder_without_the_evaluator(tmp_path):
    result = run_script("evaluations/bench_precision_recall.py", "--device", "cpu", "--ref", "8", "--samples", "8",
                        "--dim", "4", "--repeats", "1", "--suite-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --suite-dir {tmp_path}: the suite's precision/recall failed: "
                                    f"{tmp_path}/evaluations/evaluator.py not found")


def test_bench_precision_recall_names_a_missing_suite_interpreter(tmp_path):
    result = run_script("evaluations/bench_precision_recall.py", "--device", "cpu", "--ref", "8", "--samples", "8",
                        "--dim", "4", "--repeats", "1", "--suite-dir", str(tmp_path), "--suite-python",
                        str(tmp_path / "python"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: --suite-python {tmp_path / 'python'}: No such file or directory")


@pytest.mark.skipif(not (os.environ.get("SRA_SUITE_DIR") and os.environ.get("SRA_SUITE_PYTHON")),
                    reason="SRA_SUITE_DIR and SRA_SUITE_PYTHON are not set: no checkout of the suite and TensorFlow")
def test_bench_precision_recall_times_the_suite_on_the_same_features():
    result = run_script("evaluations/bench_precision_recall.py", "--device", "cpu", "--ref", "300", "--samples", "200",
                        "--repeats", "1", "--suite-dir", os.environ["SRA_SUITE_DIR"], "--suite-python",
                        os.environ["SRA_SUITE_PYTHON"])
    assert result.returncode == 0, result.stderr
    ours, suite = result.stdout.splitlines()
    assert re.fullmatch(r"the suite's code, same features: \d+\.\d{3} s \(precision 0\.\d{4}, recall 0\.\d{4}\); "
                        r"ours is \d+\.\d\dx its speed, figures (equal|NOT equal: \d+ samples and \d+ reference "
                        r"points counted otherwise)", suite), suite
    assert ours.startswith("precision/recall 300 x 200 x 2048 on cpu")
