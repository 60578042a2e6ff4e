"""Times the ADM suite's own precision/recall (its ManifoldEstimator, TensorFlow) on features saved as .npy; run
under an interpreter that has the suite's requirements (TensorFlow), usually by bench_precision_recall.py:

    python evaluations/bench_precision_recall.py --suite-dir ~/guided-diffusion --suite-python ~/tf-env/bin/python
    ~/tf-env/bin/python evaluations/suite_precision_recall.py ~/guided-diffusion REF.npy SAMPLE.npy --repeats 3

SUITE_DIR is the user's checkout of openai/guided-diffusion (its evaluations/evaluator.py is imported from there,
never copied into this project). Times the suite's compute_prec_recall steps: both sets' radii, then evaluate_pr,
after one untimed warm-up run. Prints one JSON line: {"seconds": fastest, "precision": .., "recall": ..}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite_dir", type=Path, help="a checkout of openai/guided-diffusion")
    p.add_argument("ref", type=Path, help="reference features (N, 2048) float32 .npy")
    p.add_argument("sample", type=Path, help="sample features (N, 2048) float32 .npy")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run; the fastest is printed")
    p.add_argument("--threads", type=int, default=0, help="TensorFlow intra-op threads (0: TensorFlow's default)")
    args = p.parse_args()
    evaluator_py = args.suite_dir / "evaluations" / "evaluator.py"
    if not evaluator_py.is_file():
        print(f"error: {evaluator_py} not found; the suite directory is a checkout of openai/guided-diffusion",
              file=sys.stderr)
        sys.exit(2)
    if not hasattr(np, "bool"):
        np.bool = bool  # the suite's evaluate_pr uses np.bool, which NumPy 1.24 removed
    sys.path.insert(0, str(evaluator_py.parent))
    import evaluator
    import tensorflow.compat.v1 as tf

    config = tf.ConfigProto(intra_op_parallelism_threads=args.threads, inter_op_parallelism_threads=args.threads)
    estimator = evaluator.ManifoldEstimator(tf.Session(config=config))
    ref, sample = np.load(args.ref), np.load(args.sample)

    def precision_recall():
        ref_radii, sample_radii = estimator.manifold_radii(ref), estimator.manifold_radii(sample)
        precision, recall = estimator.evaluate_pr(ref, ref_radii, sample, sample_radii)
        return float(precision[0]), float(recall[0])

    figures = precision_recall()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        precision_recall()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(seconds), "precision": figures[0], "recall": figures[1]}))


if __name__ == "__main__":
    main()
