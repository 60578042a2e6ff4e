"""What the benchmark scripts share: importing the tree of a model name, and --threads.

Both trees have a models.py, training.py, ...: `import_tree` forgets the modules of the tree used
before, so one process (a test) can use one tree after the other.
"""
import importlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TREES = {"SiT": REPO / "SiT-SRA", "DiT": REPO / "DiT-SRA"}
TREE_DEPENDENT = ("reference_step", "reference_sample")  # benchmarks/ modules that import a tree's modules


def import_tree(model_name, *names):
    """The modules `names` of the tree of `model_name` (SiT-... -> SiT-SRA/), imported by their plain names."""
    family = model_name.split("-")[0]
    if family not in TREES:
        sys.exit(f"error: --model {model_name}: expected a SiT-... or DiT-... name")
    for tree in TREES.values():
        if str(tree) in sys.path:
            sys.path.remove(str(tree))
        own = {p.stem for p in tree.glob("*.py")} | {p.parent.name for p in tree.glob("*/__init__.py")}
        for key in [key for key in sys.modules if key.split(".")[0] in own | set(TREE_DEPENDENT)]:
            del sys.modules[key]
    sys.path.insert(0, str(TREES[family]))
    return [importlib.import_module(name) for name in names]


def add_threads_flag(parser):
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1, since on a shared CPU more threads wait on each "
                             "other at every op; on GPU: torch's)")


def set_threads(args):
    """--threads, or 1 on the CPU by default."""
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
