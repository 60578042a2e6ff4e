"""The streaming reader of arr_0 and the reference statistics: contents, memory, and one-line errors."""
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import random_images

from errors import UserError
from npz_io import NpzImages, read_statistics


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_batches_are_arr_0_in_order(tmp_path, save):
    images = random_images(11, size=8)
    save(tmp_path / "a.npz", arr_0=images, other=np.zeros(3))
    with NpzImages(tmp_path / "a.npz") as reader:
        assert reader.shape == (11, 8, 8, 3) and len(reader) == 11
        batches = list(reader.batches(4))
    assert [start for start, _ in batches] == [0, 4, 8]
    assert [len(batch) for _, batch in batches] == [4, 4, 3]
    assert all(batch.flags.writeable for _, batch in batches)  # torch.from_numpy takes them without a warning
    assert np.array_equal(np.concatenate([batch for _, batch in batches]), images)


def peak_bytes_while_reading(path, batch_size):
    tracemalloc.start()
    with NpzImages(path) as reader:
        for _ in reader.batches(batch_size):
            pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Reading 64 or 1024 images of 32 px (0.2 / 3 MB) in batches of 16 (48 KB) allocates about one batch."""
    batch_bytes = 16 * 32 * 32 * 3
    for n in (64, 1024):
        np.savez(tmp_path / f"{n}.npz", arr_0=random_images(n, seed=n))
    small, large = (peak_bytes_while_reading(tmp_path / f"{n}.npz", 16) for n in (64, 1024))
    assert large < 4 * batch_bytes, (small, large)
    assert large < small + batch_bytes, (small, large)


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, r"has no arr_0 .* holds \['images'\]"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, r"arr_0 must be uint8 images \(N, H, W, 3\).*float32"),
    ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, r"must be uint8 images.*\(2, 3, 8, 8\)"),
    ({"arr_0": np.zeros((8, 8, 3), np.uint8)}, r"must be uint8 images.*\(8, 8, 3\)"),
    ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, r"with N >= 1"),
    ({"arr_0": np.asfortranarray(np.zeros((2, 8, 8, 3), np.uint8))}, r"Fortran order"),
])
def test_bad_arrays_are_one_line_errors_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message) as error:
        NpzImages(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        NpzImages(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(UserError, match="is not an .npz file"):
        NpzImages(tmp_path / "text.npz")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((5, 4, 4, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive, archive.open("arr_0.npy", "w") as entry:
        np.lib.format.write_array_header_1_0(entry, header)
        entry.write(bytes(4 * 4 * 4 * 3))  # 4 of the 5 images
    with NpzImages(tmp_path / "short.npz") as reader:
        with pytest.raises(UserError, match="short.npz: arr_0 is truncated"):
            list(reader.batches(2))


def test_reference_statistics_are_read_and_checked(tmp_path):
    stats = {"mu": np.ones(4), "sigma": np.eye(4), "mu_s": np.ones(3, np.float32), "sigma_s": np.eye(3)}
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), **stats)
    got = read_statistics(tmp_path / "ref.npz", pool_dim=4, spatial_dim=3)
    assert all(np.array_equal(got[key], stats[key]) and got[key].dtype == np.float64 for key in stats)
    np.savez(tmp_path / "plain.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert read_statistics(tmp_path / "plain.npz", pool_dim=4, spatial_dim=3) is None
    with pytest.raises(UserError, match=r"ref.npz: mu_s has shape \(3,\), expected \(5,\)"):
        read_statistics(tmp_path / "ref.npz", pool_dim=4, spatial_dim=5)
    np.savez(tmp_path / "partial.npz", mu=np.ones(4), sigma=np.eye(4))
    with pytest.raises(UserError, match=r"partial.npz has \['mu', 'sigma'\] but not all of"):
        read_statistics(tmp_path / "partial.npz", pool_dim=4, spatial_dim=3)
