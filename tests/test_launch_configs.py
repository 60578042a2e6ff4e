"""The accelerate configs in both trees: identical, read by accelerate's own loader, 8 processes per machine, and the
README's --batch-size for each keeps the global batch of 256."""
import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name, readme_batch", [("default.yaml", r"--batch-size=(\d+) --model"),
                                                ("multinode.yaml", r"--main_process_port 29500 train.py --batch-size=(\d+)")])
def test_config_is_shared_loads_and_keeps_the_global_batch(name, readme_batch):
    sit, dit = ROOT / "SiT-SRA" / "configs" / name, ROOT / "DiT-SRA" / "configs" / name
    assert sit.read_bytes() == dit.read_bytes()
    config = load_config_from_file(str(sit))
    assert config.num_processes == 8 * config.num_machines
    batches = {int(b) for b in re.findall(readme_batch, README)}
    assert batches and {b * config.num_processes for b in batches} == {256}
