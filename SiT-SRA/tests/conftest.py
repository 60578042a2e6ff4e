"""Puts this tree on sys.path so tests import its modules (models, loss, ...) by their plain names."""
import sys
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
