"""Puts demo/ on sys.path so tests import its modules (digits, vae, scoring, run_demo) by their plain names."""
import os
import sys
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
# The test machine is small and shared: OpenMP threads spinning against other processes make small
# tensors many times slower. Set before torch is imported; the demo's subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
