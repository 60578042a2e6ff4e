"""Prints the evaluator's figures beside those the ADM suite's README publishes for the same two batches.

    python evaluations/compare_with_suite.py OURS.json

OURS.json is what `evaluator.py VIRTUAL_imagenet256_labeled.npz admnet_guided_upsampled_imagenet256.npz --json` writes
(check_suite.sh runs both). The published figures are the suite's output, TensorFlow running the Inception graph, for
that pair; the differences measure this port (torch-fidelity's network, our metrics) against it.
"""
import argparse
import json
import sys
from pathlib import Path

from errors import UserError, run_main

REF_NAME, SAMPLE_NAME = "VIRTUAL_imagenet256_labeled.npz", "admnet_guided_upsampled_imagenet256.npz"
# The suite's README (openai/guided-diffusion, evaluations/README.md), its example output for that pair.
PUBLISHED = {
    "inception_score": ("Inception Score", 215.8370361328125),
    "fid": ("FID", 3.9425574129223264),
    "sfid": ("sFID", 6.140433703346162),
    "precision": ("Precision", 0.8265),
    "recall": ("Recall", 0.5309),
}


def read_figures(path):
    """{json key: float} of the five figures in an evaluator --json file; a UserError naming the file otherwise."""
    try:
        ours = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not the JSON that evaluator.py --json writes ({e})") from None
    missing = [key for key in PUBLISHED if not isinstance(ours.get(key) if isinstance(ours, dict) else None,
                                                          (int, float))]
    if missing:
        raise UserError(f"{path} has no figures {missing}; write it with evaluator.py --json")
    return ours


def comparison_lines(ours):
    """The table: one header and one line per figure, ours, the published one, ours - published (and in %)."""
    lines = [f"{'':<16} {'ours':>14} {'suite (TF)':>14} {'difference':>14}"]
    for key, (name, published) in PUBLISHED.items():
        diff = ours[key] - published
        lines.append(f"{name:<16} {ours[key]:>14.6f} {published:>14.6f} {diff:>+14.6f} {100 * diff / published:>+9.2f}%")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ours", type=Path, help="the evaluator's --json output for the suite's two batches")
    args = p.parse_args(argv)
    ours = read_figures(args.ours)
    names = (Path(str(ours.get("ref_batch"))).name, Path(str(ours.get("sample_batch"))).name)
    if names != (REF_NAME, SAMPLE_NAME):
        print(f"warning: {args.ours} scores {names[1]} against {names[0]}; the published figures are for "
              f"{SAMPLE_NAME} against {REF_NAME}", file=sys.stderr)
    if ours.get("inception_weights_verified") is False:
        print(f"warning: {args.ours} comes from unverified Inception weights (--unverified-weights)", file=sys.stderr)
    print("\n".join(comparison_lines(ours)))


if __name__ == "__main__":
    run_main(main)
