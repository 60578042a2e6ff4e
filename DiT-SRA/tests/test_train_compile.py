"""train.py --compile: the student's forward and the teacher's `features` go through torch.compile,
checkpoints keep plain parameter names (no `_orig_mod.` prefix) and load strictly into an
uncompiled model, and a compiled run resumes onto the losses of an uncompiled one.

TORCH_COMPILE_OVERRIDE_BACKENDS hands the captured graphs to the aot_eager backend: dynamo capture
and AOTAutograd run as in a real compiled run, inductor's C++ build (over a minute on 2 cores) does
not. benchmarks/tests/test_reference_step.py checks inductor's numbers on one step.
"""
import json

import torch
from conftest import MODELS, TINY_MODEL, run_script
from test_train import checkpoint, loss_log, train_args

COMPILED = {"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager", "TORCH_LOGS": "dynamo"}


def losses(out):
    return [(r["step"], r["loss"], r["align_loss"]) for r in map(json.loads, loss_log(out).splitlines())]


def test_compiled_run_traces_both_models_and_saves_plain_state_dicts(tmp_path, latent_data_dir):
    result = run_script(*train_args(tmp_path, latent_data_dir, "--max-train-steps", "2", "--compile"), env=COMPILED)
    for traced in ("start tracing forward", "start tracing features", "calling compiler function aot_eager"):
        assert traced in result.stderr, f"no '{traced}' in the dynamo log: --compile compiled nothing"
    ckpt = checkpoint(tmp_path, "step-2.pt")
    for key in ("model", "ema"):
        fresh = MODELS[TINY_MODEL](input_size=4, num_classes=10)
        fresh.load_state_dict(ckpt[key], strict=True)


def test_compiled_run_resumes_onto_the_uncompiled_losses(tmp_path, latent_data_dir):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_script(*train_args(eager, latent_data_dir, "--max-train-steps", "4"))
    run_script(*train_args(compiled, latent_data_dir, "--max-train-steps", "2", "--compile"), env=COMPILED)
    run_script(*train_args(compiled, latent_data_dir, "--max-train-steps", "4", "--compile", "--resume-ckpt", "latest"),
               env=COMPILED)
    expected, got = losses(eager), losses(compiled)
    assert [r[0] for r in got] == [1, 2, 3, 4]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
