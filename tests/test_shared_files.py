"""Files both trees carry must stay byte-identical: each tree runs alone, so they are copies.
The list is the one in CONTRIBUTING.md; a tree's tests never look at the other tree, this one does."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = ["alignment.py", "blocks.py", "checkpoints.py", "dataset.py", "sampling_io.py", "training.py", "utils.py",
          "tests/conftest.py", "tests/test_generate_common.py", "tests/test_generate_compile.py", "tests/test_models.py",
          "tests/test_multinode.py", "tests/test_sampling_io.py",
          "tests/test_train.py", "tests/test_train_compile.py", "tests/test_train_resume.py", "tests/test_training.py"]


@pytest.mark.parametrize("name", SHARED)
def test_file_is_identical_in_both_trees(name):
    sit, dit = REPO / "SiT-SRA" / name, REPO / "DiT-SRA" / name
    assert sit.is_file() and dit.is_file(), f"SiT-SRA/{name} or DiT-SRA/{name} is missing"
    assert sit.read_bytes() == dit.read_bytes(), f"SiT-SRA/{name} and DiT-SRA/{name} differ"


def test_every_file_of_the_same_name_in_both_trees_is_listed_or_the_trees_own():
    """A file added to both trees is either a shared copy (listed above) or written for each tree."""
    own = {"train.py", "generate.py", "loss.py", "models.py", "gen.sh", "tests/test_generate.py",
           "tests/test_loss.py"}

    def names(tree):
        return {str(p.relative_to(tree)) for p in tree.rglob("*") if p.suffix in (".py", ".sh") and
                "__pycache__" not in p.parts}
    both = names(REPO / "SiT-SRA") & names(REPO / "DiT-SRA")
    assert both - set(SHARED) - own == set()
