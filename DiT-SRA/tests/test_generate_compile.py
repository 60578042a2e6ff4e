"""generate.py --compile: on by default with CUDA only, one compiled graph per batch shape for a whole run (the last,
padded batch included), the eager run's samples, and a compile failure that ends with one line naming --no-compile.

The run here hands dynamo's graphs to the aot_eager backend (torch._dynamo.config.debug_backend_override, what
TORCH_COMPILE_OVERRIDE_BACKENDS sets): capture, guards and recompiles are those of a real compiled run, inductor's C++
build (minutes on 2 cores) is not. test_generate.py compares inductor's samples with the eager ones.
"""
import numpy as np
import pytest
import torch
from conftest import FAMILY, N, generate_argv, run_script, shared_behaviour, the_npz
from torch._dynamo.utils import counters

import generate
import sampling_io
from utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

# SiT guides t in [0.2, 0.7] only, so it calls the model on two batch shapes; DiT guides every step or none (one).
BATCH_SHAPES = {"SiT": 2, "DiT": 1}[FAMILY]
GEN_SH_STEPS = {"SiT": ["--num-steps", "250"], "DiT": ["--num-sampling-steps", "250", "--cfg-scale", "4.0"]}[FAMILY]


def compiled_run(argv):
    """generate.py's main in this process with --compile on aot_eager; returns the number of graphs dynamo compiled."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager"):
        generate.main(generate.parse_args([*argv[1:], "--compile"]))
    assert not counters["graph_break"]
    return counters["stats"]["unique_graphs"]


def test_compile_is_on_by_default_with_cuda_and_off_on_cpu(monkeypatch):
    def fn(x):
        return x
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device name only: nothing runs on it
    monkeypatch.setattr(sampling_io, "compile_prerequisite_problem", lambda device: None)
    assert sampling_io.compile_call(fn, cpu, None) is fn and sampling_io.compile_call(fn, cuda, False) is fn
    assert sampling_io.compile_call(fn, cuda, None) is not fn and sampling_io.compile_call(fn, cpu, True) is not fn
    monkeypatch.setattr(sampling_io, "compile_prerequisite_problem",
                        lambda device: "torch.compile needs Triton on CUDA and it is not installed")
    with pytest.raises(UserError, match="Triton.*use --no-compile"):
        sampling_io.compile_call(fn, cuda, None)
    assert sampling_io.compile_call(fn, cuda, False) is fn
    with torch._dynamo.config.patch(disable=True):  # TORCH_COMPILE_DISABLE=1: torch's switch wins, no fullgraph error
        assert sampling_io.compile_call(fn, cpu, True) is fn


def test_a_250_step_run_compiles_once_per_batch_shape(ckpt, tiny_vae_dir, tmp_path):
    """The time is a tensor input: 250 steps at 250 times reuse the graphs of the first steps."""
    one_batch = ["--num-fid-samples", "2", "--per-proc-batch-size", "2"]
    assert compiled_run(generate_argv(ckpt, tmp_path, tiny_vae_dir, *GEN_SH_STEPS, *one_batch)) == BATCH_SHAPES


def test_the_padded_last_batch_reuses_the_graphs_and_the_samples_are_the_eager_ones(base_run, ckpt, tiny_vae_dir,
                                                                                   tmp_path):
    # N = 10 samples in batches of 4: the third batch is padded to 4 rows (2 not saved), not compiled again.
    assert compiled_run(generate_argv(ckpt, tmp_path, tiny_vae_dir)) == BATCH_SHAPES
    npz, folder = the_npz(tmp_path)
    assert folder.name == base_run[1].name  # --compile changes no pixel beyond rounding: the same folder, as --tf32
    images = np.load(npz)["arr_0"]
    assert images.shape[0] == N and np.array_equal(images, np.load(base_run[0])["arr_0"])  # aot_eager: same kernels


@shared_behaviour
@pytest.mark.parametrize("compiler, message", [
    ("missing", "error: --compile: torch.compile needs a C++ compiler on the CPU"),  # found before any sampling
    ("builds nothing", "error: --compile: torch.compile failed ("),  # inductor's build fails in the first call
])
def test_a_compile_failure_ends_with_one_line_naming_no_compile(ckpt, tiny_vae_dir, tmp_path, compiler, message):
    """Inductor builds its CPU kernels with $CXX (a private cache, so none comes from an earlier run): a compiler
    that is not there, or one that answers --version but builds nothing."""
    cxx = tmp_path / "g++"
    if compiler == "builds nothing":
        cxx.write_text('#!/bin/sh\nif [ "$1" = --version ]; then exec g++ --version; fi\n'
                       'echo "g++: fatal error: this compiler builds nothing" >&2\nexit 1\n')
        cxx.chmod(0o755)
    env = {"CXX": str(cxx), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = run_script(*generate_argv(ckpt, tmp_path / "samples", tiny_vae_dir, "--compile"), env=env, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[-1].startswith(message) and lines[-1].endswith("use --no-compile"), lines[-1]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "samples").glob("*.npz"))
