"""Reads the images `arr_0` of an .npz in batches, without loading the array, and the statistics it may carry.

50,000 images at 512 px are 39 GB of uint8: only one batch is in memory at a time, read straight from the zip
entry (stored or deflated) after its .npy header.
"""
import zipfile
from pathlib import Path

import numpy as np

from errors import UserError

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzImages:
    """`arr_0` of one .npz: uint8 images (N, H, W, 3), read in order by `batches`, and `crc32`, the zip's checksum of
    it. A context manager.

    Errors name the file: missing file, not a zip, no `arr_0`, another dtype or shape, truncated data."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise UserError(f"{self.path}: no such file") from None
        except (zipfile.BadZipFile, IsADirectoryError, OSError) as e:
            raise UserError(f"{self.path} is not an .npz file ({e})") from None
        if "arr_0.npy" not in self._zip.namelist():
            self._zip.close()
            raise UserError(f"{self.path} has no arr_0 (the images, uint8 (N, H, W, 3)); it holds "
                            f"{[name.removesuffix('.npy') for name in self._zip.namelist()]}")
        self.crc32 = self._zip.getinfo("arr_0.npy").CRC  # of the whole .npy, stored by the zip: a free content key
        self._entry = self._zip.open("arr_0.npy")
        try:
            self.shape = self._read_header()
        except UserError:
            self.close()
            raise

    def _read_header(self):
        try:
            version = np.lib.format.read_magic(self._entry)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = read[version](self._entry)
        except ValueError as e:
            raise UserError(f"{self.path}: arr_0 is not a readable .npy array ({e})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] == 0:
            raise UserError(f"{self.path}: arr_0 must be uint8 images (N, H, W, 3) with N >= 1, "
                            f"got {dtype} {tuple(shape)}")
        if fortran_order:
            raise UserError(f"{self.path}: arr_0 is stored in Fortran order; save np.ascontiguousarray(images)")
        return tuple(int(s) for s in shape)

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        """Yields (start index, writable uint8 array (<= batch_size, H, W, 3)) until all N images are read."""
        image_bytes = int(np.prod(self.shape[1:]))
        for start in range(0, len(self), batch_size):
            count = min(batch_size, len(self) - start)
            buffer = bytearray(count * image_bytes)
            if self._entry.readinto(buffer) != len(buffer):
                raise UserError(f"{self.path}: arr_0 is truncated (fewer than its {len(self)} images)")
            yield start, np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])

    def close(self):
        self._entry.close()
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_statistics(path, pool_dim, spatial_dim):
    """The precomputed `mu (P,), sigma (P, P), mu_s (S,), sigma_s (S, S)` of a reference batch as a dict of float64
    arrays, or None when it has none. P = pool_dim, S = spatial_dim; another shape or a partial set is a UserError."""
    with np.load(path) as npz:
        present = [key for key in STAT_KEYS if key in npz.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            raise UserError(f"{path} has {present} but not all of {list(STAT_KEYS)}")
        stats = {key: np.asarray(npz[key], dtype=np.float64) for key in STAT_KEYS}
    expected = {"mu": (pool_dim,), "sigma": (pool_dim, pool_dim), "mu_s": (spatial_dim,),
                "sigma_s": (spatial_dim, spatial_dim)}
    for key, shape in expected.items():
        if stats[key].shape != shape:
            raise UserError(f"{path}: {key} has shape {stats[key].shape}, expected {shape} (Inception pool_3 "
                            f"features are {pool_dim}-d, the spatial ones {spatial_dim}-d)")
    return stats
