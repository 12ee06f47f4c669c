"""Read or write a dataset whatever its format: dispatch on content, then on the extension."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import h5py

from ..errors import FileFormatError, InvalidInputError
from ._checks import open_hdf5
from ._cxi import read_cxi, write_cxi
from ._dataset import PtychoDataset
from ._npz import read_npz, write_npz

__all__ = ["read_dataset", "write_dataset"]

_HDF5_SUFFIXES = (".cxi", ".h5", ".hdf5", ".nxs")


def _is_product(path: Path) -> bool:
    # open_hdf5: a truncated or corrupt file is a FileFormatError, like in read_cxi
    with open_hdf5(path) as f:
        return "entry_1" not in f and "probe" in f and "object" in f


def read_dataset(path: str | Path, **options: Any) -> PtychoDataset:
    """Read a PtychoPINN NPZ or a CXI file, recognised by content (HDF5 or ZIP signature) and,
    failing that, by extension (``.npz``; ``.cxi``, ``.h5``, ``.hdf5``, ``.nxs``).

    Parameters
    ----------
    path : str or pathlib.Path
        The file.
    **options
        Passed to :func:`read_cxi` (e.g. ``dc_position="corner"``); NPZ takes none.

    Returns
    -------
    PtychoDataset
        Validated, in the project's conventions.

    Raises
    ------
    FileFormatError
        Missing file, unknown kind, a ptychodus product (no diffraction: use
        :func:`read_product`), or a bad field.

    Examples
    --------
    >>> ds = read_dataset("scan_042.cxi")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "", "no such file")
    suffix = path.suffix.lower()
    if h5py.is_hdf5(path):
        if _is_product(path):
            raise FileFormatError(path, "", "a ptychodus product holds a reconstruction, not "
                                  "diffraction data: read it with read_product")
        return read_cxi(path, **options)
    if zipfile.is_zipfile(path) or suffix == ".npz":
        if options:
            raise InvalidInputError(f"read_npz takes no options, got {sorted(options)}")
        return read_npz(path)
    if suffix in _HDF5_SUFFIXES:
        return read_cxi(path, **options)  # raises "not a readable HDF5 file"
    raise FileFormatError(path, "", f"unknown kind of file (extension {suffix!r}, neither HDF5 "
                          "nor NPZ content): expected a CXI (.cxi/.h5) or PtychoPINN .npz file")


def write_dataset(dataset: PtychoDataset, path: str | Path, **options: Any) -> Path:
    """Write ``dataset`` as NPZ (``.npz``) or CXI (``.cxi``, ``.h5``, ``.hdf5``, ``.nxs``).

    Parameters
    ----------
    dataset : PtychoDataset
        What to write.
    path : str or pathlib.Path
        Output file; its extension picks the format.
    **options
        Passed to :func:`write_npz` or :func:`write_cxi`.

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> write_dataset(ds, "scan_042.npz", amplitude=False)  # doctest: +SKIP
    PosixPath('scan_042.npz')
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return write_npz(dataset, path, **options)
    if suffix in _HDF5_SUFFIXES:
        return write_cxi(dataset, path, **options)
    raise InvalidInputError(f"{path}: unknown file type {suffix!r}; expected .npz, .cxi, .h5, "
                            ".hdf5 or .nxs")
