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


def test_gpu_check_script_writes_one_table_of_every_part_into_out(tmp_path):
    """The prepared GPU run (one try on a lent GPU is all a session gets), end to end at tiny settings on the CPU:
    its flags parse, every part (training eager and compiled, sampling fp32, bf16 and compiled, the Inception
    pass, and vs_released.sh when SRA_RELEASED_DIR is set) finishes, and OUT holds the reports and one table of
    them, with the evaluator's precision/recall. TORCH_COMPILE_DISABLE makes torch.compile a no-op here (a cold compile
    would add minutes); compiled steps are tested in the trees' test_train_compile.py and test_reference_step.py."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TORCH_COMPILE_DISABLE": "1", "BUDGET_S": "1500",
           "SAMPLE_FLAGS": "--model SiT-T/2 --resolution 32 --threads 1 --num-samples 2 --num-steps 3 --warmup-steps 1",
           "INCEPTION_FLAGS": "--device cpu --threads 1 --batch-size 2 --batches 1 --resolution 32",
           "PR_FLAGS": "--device cpu --threads 1 --ref 40 --samples 30"}
    released = os.environ.get("SRA_RELEASED_DIR")
    if released:
        env.update(RELEASED_DIR=released, RELEASED_PYTHON=os.environ.get("SRA_RELEASED_PYTHON", sys.executable),
                   VS_RELEASED_FLAGS="--models DiT-S/8 --batch-size 2 --train-steps 4 --warmup 1 --mixed-precision no "
                                     "--num-workers 0")
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--model", "SiT-T/2", *TINY, "--batch-size",
                             "2", "--mixed-precision", "bf16", "--block-out-s", "2", "--block-out-t", "4", "--warmup",
                             "1", "--steps", "1", "--rounds", "1"], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torch" in (tmp_path / "env.txt").read_text()
    for name, compiled in (("train_eager.txt", False), ("train_compiled.txt", True)):
        report = (tmp_path / name).read_text()
        assert f"SiT-T/2 32px (latent 4x4), batch 2, precision bf16, compile {compiled}, block-out-s 2" in report, report
    table = (tmp_path / "table.md").read_text()
    assert table == result.stdout
    rows = table.splitlines()
    assert rows[:2] == ["| check | run | img/s | vs reference | notes |", "|---|---|---|---|---|"]
    number = r"[0-9]+\.[0-9]+"
    for part, file in (("training, eager", "train_eager.txt"), ("training, --compile", "train_compiled.txt"),
                       ("sampling, fp32", "sample_fp32.txt")):
        assert re.search(rf"^\| {part} \(bench_\w+.py\) \| reference \| {number} \| 1.00x \| {file} \|\n"
                         rf"\|  \| ours \| {number} \| {number}x \| .*{file} \|$", table, re.M), table
    assert "graph breaks: n/a (dynamo disabled); host-device syncs per step: n/a" in table  # TORCH_COMPILE_DISABLE
    for part, file in (("sampling, bf16", "sample_bf16.txt"), ("sampling, fp32 compiled", "sample_compiled.txt")):
        assert re.search(rf"^\| {part} \(bench_sample.py\) \| ours \| {number} \| {number}x \| {file} \|$",
                         table, re.M), table  # compared with the fp32 run's reference
    assert re.search(rf"^\| evaluator's Inception pass \| ours \| {number} \| - \| Inception pass on cpu \(.*\); inception.txt \|$",
                     table, re.M), table
    assert re.search(rf"^\| evaluator's precision/recall \| ours \| - \| - \| {number} s for 40 x 30 x 2048 on cpu "
                     rf"\(1 CPU threads\) \(precision {number}, recall {number}\); precision_recall.txt \|$",
                     table, re.M), table
    if released:
        assert re.search(rf"^\| vs released: DiT-S/8 train, .* \| released \| {number} \| 1.00x \| median step "
                         rf"interval {number} ms \(median of 2\) \|$", table, re.M), table


@pytest.mark.parametrize("model", ["SiT-T/2", "DiT-T/2"])
def test_bench_sample_times_both_modes_and_prints_the_ratio(model):
    out = run_script("benchmarks/bench_sample.py", "--model", model, *TINY, "--num-steps", "4", "--warmup-steps",
                     "2", "--rounds", "1", "--precision", "bf16")
    for mode in ("reference", "ours"):
        assert re.search(rf"^{mode} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", out, re.M), f"no row for {mode}:\n{out}"
    assert re.search(r"^ratio ours/reference images/s: [0-9.]+x$", out, re.M)
