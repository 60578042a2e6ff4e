"""Files both trees carry must stay byte-identical: each tree runs alone, so they are copies."""
import pytest
from conftest import TREE

SHARED = ["blocks.py", "dataset.py", "utils.py", "training.py", "sampling_io.py", "tests/conftest.py", "tests/test_sampling_io.py"]


@pytest.mark.parametrize("name", SHARED)
def test_file_is_identical_in_both_trees(name):
    other = TREE.parent / "DiT-SRA" / name
    assert other.is_file(), f"DiT-SRA/{name} is missing"
    assert (TREE / name).read_bytes() == other.read_bytes(), f"SiT-SRA/{name} and DiT-SRA/{name} differ"
