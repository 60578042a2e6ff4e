"""The one markdown table of gpu_check.sh, from the reports it left in a folder.

    python benchmarks/gpu_check_table.py OUT_DIR        # prints the table; gpu_check.sh writes it to OUT_DIR/table.md

Reads OUT_DIR/train_eager.txt and train_compiled.txt (bench_train.py), sample_fp32.txt, sample_bf16.txt and
sample_compiled.txt (bench_sample.py; the bf16 and compiled runs time ours only and are compared with the fp32
run's reference), inception.txt (evaluations/bench_inception.py), precision_recall.txt
(evaluations/bench_precision_recall.py) and vs_released.txt (vs_released.py's table,
whose rows are taken over as they are). A report that is missing, or holds no result, gives a row saying so and
naming its file.
"""
import re
import sys
from pathlib import Path

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def read(folder, name):
    path = Path(folder) / name
    return path.read_text(errors="replace") if path.is_file() else ""


def bench_rows(text, name, part, reference_ips=None):
    """Rows of a bench_train.py / bench_sample.py report: reference and ours with img/s, the ratio and notes."""
    found = {m.group(1): m for m in re.finditer(rf"^(reference|ours) +{NUMBER} +{NUMBER}(.*)$", text, re.M)}
    if "ours" not in found:
        return [(part, "-", "-", "-", f"no result, see {name}")]
    notes = []
    mfu = re.search(rf" {NUMBER}%$", found["ours"].group(4))
    if mfu:
        notes.append(f"MFU {mfu.group(1)}%")
    breaks = re.search(r"^graph breaks \(torch._dynamo.explain\) in ours' compiled functions: (.*)$", text, re.M)
    if breaks:
        notes.append(f"graph breaks: {breaks.group(1)}")
    syncs = re.search(r"^host-device syncs in one ours step: (\S+)", text, re.M)
    if syncs:
        notes.append(f"host-device syncs per step: {syncs.group(1)}")
    rows = []
    if "reference" in found:
        reference_ips = float(found["reference"].group(2))
        rows.append((part, "reference", found["reference"].group(2), "1.00x", name))
    ours_ips = float(found["ours"].group(2))
    ratio = f"{ours_ips / reference_ips:.2f}x" if reference_ips else "-"
    rows.append((part if not rows else "", "ours", found["ours"].group(2), ratio, "; ".join(notes + [name])))
    return rows


def reference_ips(text):
    match = re.search(rf"^reference +{NUMBER} ", text, re.M)
    return float(match.group(1)) if match else None


def inception_row(text):
    match = re.search(rf"^(.*): {NUMBER} images/s$", text, re.M)
    if not match:
        return ("evaluator's Inception pass", "-", "-", "-", "no result, see inception.txt")
    return ("evaluator's Inception pass", "ours", match.group(2), "-", f"{match.group(1)}; inception.txt")


def precision_recall_row(text):
    match = re.search(rf"^precision/recall (.*): {NUMBER} s \((.*)\)$", text, re.M)
    if not match:
        return ("evaluator's precision/recall", "-", "-", "-", "no result, see precision_recall.txt")
    return ("evaluator's precision/recall", "ours", "-", "-",
            f"{match.group(2)} s for {match.group(1)} ({match.group(3)}); precision_recall.txt")


def vs_released_rows(text):
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")
            and not line.startswith("| work ")]
    return [(f"vs released: {work.strip()}" if work.strip() else "", run.strip(), ips.strip(), ratio.strip(),
             f"median step interval {interval.strip()}") for work, run, ips, interval, ratio in rows]


def table(folder):
    sample_reference = reference_ips(read(folder, "sample_fp32.txt"))
    rows = [*bench_rows(read(folder, "train_eager.txt"), "train_eager.txt", "training, eager (bench_train.py)"),
            *bench_rows(read(folder, "train_compiled.txt"), "train_compiled.txt",
                        "training, --compile (bench_train.py)"),
            *bench_rows(read(folder, "sample_fp32.txt"), "sample_fp32.txt", "sampling, fp32 (bench_sample.py)"),
            *bench_rows(read(folder, "sample_bf16.txt"), "sample_bf16.txt", "sampling, bf16 (bench_sample.py)",
                        sample_reference),
            *bench_rows(read(folder, "sample_compiled.txt"), "sample_compiled.txt",
                        "sampling, fp32 compiled (bench_sample.py)", sample_reference),
            inception_row(read(folder, "inception.txt")),
            precision_recall_row(read(folder, "precision_recall.txt"))]
    released = read(folder, "vs_released.txt")
    if released:
        rows += vs_released_rows(released) or [("vs released", "-", "-", "-", "no table, see vs_released.txt")]
    lines = ["| check | run | img/s | vs reference | notes |", "|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_check_table.py OUT_DIR")
    print(table(sys.argv[1]))
