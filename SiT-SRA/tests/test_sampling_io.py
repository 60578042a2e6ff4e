"""Units of sampling_io.py, generate.py's model-independent part: per-sample seeds, flag limits, PNGs, the .npz.

This file is identical in SiT-SRA/ and DiT-SRA/ (a test checks it), like sampling_io.py itself.
"""
import argparse
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sampling_io
from utils import UserError


def test_write_npz_atomic_writes_the_bytes_of_np_savez(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    # np.savez must not depend on the clock (zip entries could carry a timestamp): write again at another "time".
    monkeypatch.setattr(time, "localtime", lambda *a: time.struct_time((2001, 2, 3, 4, 5, 6, 0, 1, 0)))
    monkeypatch.setattr(time, "time", lambda: 981173106.0)
    np.savez(tmp_path / "again.npz", arr_0=images)
    sampling_io.write_npz_atomic(tmp_path / "streamed.npz", iter(images), images.shape)
    reference = (tmp_path / "ref.npz").read_bytes()
    assert (tmp_path / "again.npz").read_bytes() == reference
    assert (tmp_path / "streamed.npz").read_bytes() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "ref.npz", "streamed.npz"]  # no temp left


def test_row_draws_depend_only_on_their_own_seed():
    seeds = [sampling_io.sample_seed(7, i) for i in range(5)]
    assert seeds == [7_000_000 + i for i in range(5)]
    batch = sampling_io.RowGenerators(seeds, torch.device("cpu"))
    alone = sampling_io.RowGenerators(seeds[3:4], torch.device("cpu"))
    for draw in (lambda r: r.randn((4, 2, 2)), lambda r: r.randint(10),
                 lambda r: r.fill_normal(torch.zeros(len(r.generators), 4, 2, 2, dtype=torch.float64))):
        together, single = draw(batch), draw(alone)
        assert torch.equal(together[3:4], single)
        assert not torch.equal(together[2], together[3])


def test_fill_normal_writes_the_draws_of_randn():
    """fill_normal (the samplers' step noise) writes into the tensor it is given, step after step, what randn of one
    row's shape gives from the same generators."""
    seeds = [3, 4, 5]
    filled, drawn = (sampling_io.RowGenerators(seeds, torch.device("cpu")) for _ in range(2))
    out = torch.empty(3, 4, 2, 2, dtype=torch.float64)
    for _ in range(2):
        assert filled.fill_normal(out) is out
        assert torch.equal(out, drawn.randn((4, 2, 2), torch.float64))


def common_flags(**changes):
    """The flags check_common_flags reads, at the released defaults, with `changes`."""
    flags = dict(resolution=256, per_proc_batch_size=64, num_fid_samples=50_000, num_classes=1000, global_seed=0)
    return argparse.Namespace(**{**flags, **changes})


def test_seeds_fit_the_32_bits_torch_keeps():
    # torch's CPU generator keeps only the low 32 bits of a seed: larger seeds would repeat other seeds' samples.
    assert sampling_io.sample_seed(sampling_io.MAX_GLOBAL_SEED, sampling_io.SEED_STRIDE - 1) < 2 ** 32
    sampling_io.check_common_flags(common_flags(global_seed=sampling_io.MAX_GLOBAL_SEED))
    sampling_io.check_common_flags(common_flags(num_fid_samples=1_000_000, per_proc_batch_size=1000))
    for flag, value in (("--global-seed", sampling_io.MAX_GLOBAL_SEED + 1), ("--global-seed", -1),
                        ("--num-fid-samples", 1_000_001), ("--num-fid-samples", 0), ("--per-proc-batch-size", 0),
                        ("--num-classes", 0), ("--resolution", 30)):
        with pytest.raises(UserError, match=flag):
            sampling_io.check_common_flags(common_flags(**{flag[2:].replace("-", "_"): value}))


def test_read_png_rejects_missing_truncated_and_wrong_size(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    good = tmp_path / "000000.png"
    sampling_io.save_png_atomic(image, good)
    assert np.array_equal(sampling_io.read_png(good, 32), image)
    truncated = tmp_path / "000001.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    small = tmp_path / "000002.png"
    Image.fromarray(image[:16, :16]).save(small)
    for path in (truncated, small, tmp_path / "000003.png"):
        assert sampling_io.read_png(path, 32) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_autocast_call_returns_float32():
    fn = sampling_io.autocast_call(lambda x, scale=1.0: x @ x * scale, torch.device("cpu"), "bf16")
    out = fn(torch.ones(2, 2), scale=2.0)
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((2, 2), 4.0))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_weights_cast_once_give_the_numbers_of_autocast_from_float32_weights(precision):
    import models
    factories = models.SiT_models if hasattr(models, "SiT_models") else models.DiT_models
    torch.manual_seed(0)
    model = factories[next(name for name in factories if name.endswith("-T/2"))](input_size=4, num_classes=10).eval()
    with torch.no_grad():  # no zero-initialised gates or outputs: every layer shapes the result
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0, 3, 10])
    cpu = torch.device("cpu")
    with torch.no_grad():
        expected = sampling_io.autocast_call(model, cpu, precision)(x, t, y)
        sampling_io.cast_for_autocast(model, precision)
        got = sampling_io.autocast_call(model, cpu, precision)(x, t, y)
    assert torch.equal(got, expected)
    dtypes = {p.dtype for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              for p in m.parameters()}
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert model.y_embedder.embedding_table.weight.dtype == torch.float32


def test_sample_folder_names_the_experiment_of_a_train_py_checkpoint(tmp_path):
    """The same step of two experiments gets two folders (the released `{exp}-` in front); a checkpoint outside
    train.py's `{exp}/checkpoints/` keeps the plain name."""
    def name(ckpt):
        args = argparse.Namespace(ckpt=str(ckpt), model="SiT-XL/2", resolution=256, vae="ema", cfg_scale=1.8,
                                  global_seed=0, num_classes=1000)
        return sampling_io.sample_folder_name(args, "sde-steps-250")

    plain = "SiT-XL-2-step-100-size-256-vae-ema-cfg-1.8-seed-0-sde-steps-250"
    assert name(tmp_path / "exps" / "run-a" / "checkpoints" / "step-100.pt") == f"run-a-{plain}"
    assert name(tmp_path / "exps" / "run-b" / "checkpoints" / "step-100.pt") == f"run-b-{plain}"
    assert name(tmp_path / "downloads" / "step-100.pt") == plain
