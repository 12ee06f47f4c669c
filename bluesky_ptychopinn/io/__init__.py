"""File formats: PtychoPINN NPZ, CXI, the ptychodus product (read), and the probe library.

Every reader returns a :class:`PtychoDataset` in the project's conventions and records the
conversions it applied; bad files raise :class:`~bluesky_ptychopinn.errors.FileFormatError`
naming the file, the field and what was expected.
"""

from ._cxi import EV_TO_J, read_cxi, write_cxi
from ._dataset import PtychoDataset
from ._generic import read_dataset, write_dataset
from ._npz import read_npz, write_npz
from ._probe_library import ProbeLibrary, probe_array_sha256, read_probe
from ._product import Reconstruction, read_product

__all__ = [
    "EV_TO_J",
    "ProbeLibrary",
    "PtychoDataset",
    "Reconstruction",
    "probe_array_sha256",
    "read_cxi",
    "read_dataset",
    "read_npz",
    "read_probe",
    "read_product",
    "write_cxi",
    "write_dataset",
    "write_npz",
]
