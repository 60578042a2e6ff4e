"""benchmarks/bench_train.py and bench_sample.py run end to end on a tiny SiT and DiT and print both
modes and their ratio (the figures themselves are measured by hand, see benchmarks/README.md)."""
import os
import re
import subprocess
import sys

import pytest
from conftest import BENCHMARKS, run_script

TINY = ["--resolution", "32", "--threads", "1"]


@pytest.mark.parametrize("model", ["SiT-T/2", "DiT-T/2"])
def test_bench_train_times_both_modes_and_prints_the_ratio(model):
    out = run_script("benchmarks/bench_train.py", "--model", model, *TINY, "--batch-size", "2", "--warmup", "1",
                     "--steps", "1", "--rounds", "2")
    assert "block-out-s 2, block-out-t 4 of 6" in out
    for mode in ("reference", "ours"):
        row = re.search(rf"^{mode} +([0-9.]+) +([0-9.]+)((?: +[0-9.]+){{6}}) +[0-9.]+ +[0-9.]+$", out, re.M)
        assert row, f"no result row for {mode}:\n{out}"
        assert float(row.group(1)) > 0 and sum(map(float, row.group(3).split())) > 0
    assert re.search(r"^ratio ours/reference images/s: [0-9.]+x$", out, re.M)
    # what --compile compiles traces into one graph each (a graph break would split and slow the compiled step)
    assert ("graph breaks (torch._dynamo.explain) in ours' compiled functions: student forward 0 (1 graph), "
            "teacher features 0 (1 graph)") in out
    assert "host-device syncs in one ours step: n/a on a CPU" in out


def test_gpu_check_script_runs_both_benchmarks_into_out(tmp_path):
    """The prepared GPU run (one try on a lent GPU is all a session gets), end to end on a tiny model on the CPU:
    its flags parse, both runs (without and with --compile) finish and their reports land in $OUT.
    TORCH_COMPILE_DISABLE makes torch.compile a no-op here (a cold compile would add a minute); compiled steps are
    tested in the trees' test_train_compile.py and in test_reference_step.py."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TORCH_COMPILE_DISABLE": "1"}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--model", "SiT-T/2", *TINY, "--batch-size",
                             "2", "--warmup", "1", "--steps", "1", "--rounds", "1"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch" in (tmp_path / "env.txt").read_text()
    for name, compiled in (("train_sitxl2_bf16.txt", False), ("train_sitxl2_bf16_compile.txt", True)):
        report = (tmp_path / name).read_text()
        assert f"SiT-T/2 32px (latent 4x4), batch 2, precision bf16, compile {compiled}" in report, report
        assert re.search(r"^ratio ours/reference images/s: [0-9.]+x$", report, re.M), report


@pytest.mark.parametrize("model", ["SiT-T/2", "DiT-T/2"])
def test_bench_sample_times_both_modes_and_prints_the_ratio(model):
    out = run_script("benchmarks/bench_sample.py", "--model", model, *TINY, "--num-steps", "4", "--warmup-steps",
                     "2", "--rounds", "1", "--precision", "bf16")
    for mode in ("reference", "ours"):
        assert re.search(rf"^{mode} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", out, re.M), f"no row for {mode}:\n{out}"
    assert re.search(r"^ratio ours/reference images/s: [0-9.]+x$", out, re.M)
