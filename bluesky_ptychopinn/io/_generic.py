"""Read or write a dataset by file type."""

from __future__ import annotations

from pathlib import Path

from ..errors import FileFormatError
from ._cxi import read_cxi, write_cxi
from ._dataset import PtychoDataset
from ._npz import read_npz, write_npz

__all__ = ["read_dataset", "write_dataset"]


def read_dataset(path: str | Path) -> PtychoDataset:
    """Read ``.npz`` (PtychoPINN contract) or ``.cxi`` / ``.h5`` / ``.hdf5`` (CXI layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "", "no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix in (".cxi", ".h5", ".hdf5", ".nxs"):
        return read_cxi(path)
    raise FileFormatError(path, "", f"unknown file type {suffix!r}; expected .npz or .cxi")


def write_dataset(ds: PtychoDataset, path: str | Path) -> Path:
    """Write by extension: ``.npz`` or ``.cxi`` (also ``.h5``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return write_npz(ds, path)
    if suffix in (".cxi", ".h5", ".hdf5"):
        return write_cxi(ds, path)
    raise FileFormatError(path, "", f"unknown file type {suffix!r}; expected .npz or .cxi")
