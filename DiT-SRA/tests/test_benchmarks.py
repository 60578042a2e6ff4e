"""benchmarks/bench_train.py and bench_sample.py run end to end on a tiny DiT and print both modes
and their ratio (the figures themselves are measured by hand, see benchmarks/README.md)."""
import re

from conftest import run_script

TINY = ["--model", "DiT-T/2", "--resolution", "32", "--threads", "1"]


def test_bench_train_times_both_modes_and_prints_the_ratio():
    out = run_script("../benchmarks/bench_train.py", *TINY, "--batch-size", "2", "--warmup", "1", "--steps", "1",
                     "--rounds", "2").stdout
    assert "block-out-s 2, block-out-t 4 of 6" in out
    for mode in ("reference", "ours"):
        row = re.search(rf"^{mode} +([0-9.]+) +([0-9.]+)((?: +[0-9.]+){{6}}) +[0-9.]+ +[0-9.]+$", out, re.M)
        assert row, f"no result row for {mode}:\n{out}"
        assert float(row.group(1)) > 0 and sum(map(float, row.group(3).split())) > 0
    assert re.search(r"^ratio ours/reference images/s: [0-9.]+x$", out, re.M)


def test_bench_sample_times_both_modes_and_prints_the_ratio():
    out = run_script("../benchmarks/bench_sample.py", *TINY, "--num-steps", "4", "--warmup-steps", "2",
                     "--rounds", "1", "--precision", "bf16").stdout
    for mode in ("reference", "ours"):
        assert re.search(rf"^{mode} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$", out, re.M), f"no row for {mode}:\n{out}"
    assert re.search(r"^ratio ours/reference images/s: [0-9.]+x$", out, re.M)
