"""train.py --compile: on by default on CUDA only; the student's forward and the teacher's
`features` go through torch.compile, the first step's time is logged, checkpoints keep plain
parameter names (no `_orig_mod.` prefix) and load strictly into an uncompiled model, and a compiled
run of two processes, stopped and resumed, gives the losses of an uncompiled one; where torch.compile
cannot work the run ends with one line naming --no-compile instead of running eagerly.

TORCH_COMPILE_OVERRIDE_BACKENDS hands the captured graphs to the aot_eager backend: dynamo capture
and AOTAutograd run as in a real compiled run, inductor's C++ build (over a minute on 2 cores) does
not. benchmarks/tests/test_reference_step.py checks inductor's numbers on one step.
"""
import argparse
import json

import pytest
import torch
import torch._inductor.config
from conftest import MODELS, TINY_MODEL, run_script, shared_behaviour
from test_train import checkpoint, loss_log, train_args
from test_train_resume import DIST_ENV, torchrun
from training import resolve_compile
from utils import UserError, compile_by_default, compile_prerequisite_problem

COMPILED = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager", "TORCH_LOGS": "dynamo"}
NO_CXX = {"CXX": "/no/such/dir/g++"}  # inductor's compiler for CPU kernels (torch._inductor.config.cpp.cxx)


def losses(out):
    return [(r["step"], r["loss"], r["align_loss"]) for r in map(json.loads, loss_log(out).splitlines())]


def test_compile_is_the_default_on_cuda_only():
    assert compile_by_default(torch.device("cuda")) and compile_by_default(torch.device("cuda", 3))
    assert not compile_by_default(torch.device("cpu"))
    for given, expected in ((None, False), (False, False), (True, True)):
        args = argparse.Namespace(compile=given)
        assert resolve_compile(args, torch.device("cpu")) is expected and args.compile is expected


def test_missing_cpu_compiler_is_named_with_no_compile():
    assert compile_prerequisite_problem(torch.device("cpu")) is None  # the test machine's g++ works
    with torch._inductor.config.patch({"cpp.cxx": (None, NO_CXX["CXX"])}):
        assert "C++ compiler" in compile_prerequisite_problem(torch.device("cpu"))
        assert resolve_compile(argparse.Namespace(compile=None), torch.device("cpu")) is False  # CPU: eager
        with pytest.raises(UserError, match="--no-compile"):
            resolve_compile(argparse.Namespace(compile=True), torch.device("cpu"))


@shared_behaviour
def test_train_compile_without_a_compiler_stops_with_one_line(tmp_path, latent_data_dir):
    result = run_script(*train_args(tmp_path / "compiled", latent_data_dir, "--max-train-steps", "1", "--compile"),
                        env=NO_CXX, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --compile: torch.compile needs a C++ compiler") and "--no-compile" in last, last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "compiled" / "exp" / "checkpoints" / "step-1.pt").exists()
    run_script(*train_args(tmp_path / "eager", latent_data_dir, "--max-train-steps", "1"), env=NO_CXX)  # CPU default
    assert json.loads((tmp_path / "eager" / "exp" / "args.json").read_text())["compile"] is False


@shared_behaviour
def test_a_compile_failure_stops_the_run_with_one_line_instead_of_training_eagerly(tmp_path, latent_data_dir):
    """A C++ compiler that answers --version but builds nothing passes the check; inductor's build then fails
    for real in the first step (a private inductor cache, so no kernel comes from an earlier run)."""
    broken = tmp_path / "g++"
    broken.write_text('#!/bin/sh\nif [ "$1" = --version ]; then exec g++ --version; fi\n'
                      'echo "g++: fatal error: this compiler builds nothing" >&2\nexit 1\n')
    broken.chmod(0o755)
    result = run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "1", "--compile"),
                        env={"CXX": str(broken), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "error: --compile: torch.compile failed (" in result.stderr and "--no-compile" in result.stderr, last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "exp" / "losses.jsonl").exists() or not loss_log(tmp_path).strip()  # no step was trained


def test_compiled_two_process_run_traces_both_models_saves_plain_weights_and_resumes_onto_the_eager_losses(
        tmp_path, latent_data_dir):
    """Two processes: 4 eager steps; 2 compiled steps, then resumed compiled to 4: the same losses."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    two_steps = ["--batch-size", "2", "--max-train-steps", "2", "--compile"]
    run_script(*torchrun(*train_args(eager, latent_data_dir, "--batch-size", "2", "--max-train-steps", "4")),
               env=DIST_ENV)
    result = run_script(*torchrun(*train_args(compiled, latent_data_dir, *two_steps)), env={**DIST_ENV, **COMPILED})
    for traced in ("start tracing forward", "start tracing features", "calling compiler function aot_eager"):
        assert result.stderr.count(traced) >= 2, f"'{traced}' not in every process's dynamo log"
    assert "first step, compiling included: " in (compiled / "exp" / "log.txt").read_text()
    ckpt = checkpoint(compiled, "step-2.pt")
    for key in ("model", "ema"):
        MODELS[TINY_MODEL](input_size=4, num_classes=10).load_state_dict(ckpt[key], strict=True)
    run_script(*torchrun(*train_args(compiled, latent_data_dir, *two_steps[:2], "--max-train-steps", "4", "--compile",
                                     "--resume-ckpt", "latest")), env={**DIST_ENV, **COMPILED})
    got = losses(compiled)
    assert [r[0] for r in got] == [1, 2, 3, 4]
    torch.testing.assert_close(got, losses(eager), rtol=1e-5, atol=0)
