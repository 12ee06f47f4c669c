"""File formats: PtychoPINN NPZ, CXI, the ptychodus product (read only), and the probe library.

Every reader returns data in the project's conventions (docs/conventions.md) and records the
conversions it applied in ``metadata["conversions"]`` (amplitude -> counts, DC corner -> centre,
joules -> eV, metres -> object pixels); bad files raise
:class:`~bluesky_ptychopinn.errors.FileFormatError` naming the file, the field and what was
expected. numpy and h5py only: importing this package does not import torch.
"""

from ..geometry import (
    EV_TO_J,
    HC_EV_M,
    object_pixel_size_m,
    positions_m_to_px,
    positions_px_to_m,
    wavelength_m,
)
from ._cxi import read_cxi, write_cxi
from ._dataset import PtychoDataset
from ._generic import read_dataset, write_dataset
from ._npz import read_npz, write_npz
from ._probe_library import (
    ProbeLibrary,
    default_probe_library_root,
    load_probe_reference,
    probe_array_sha256,
    read_probe,
)
from ._product import Reconstruction, read_product

__all__ = [
    "EV_TO_J",
    "HC_EV_M",
    "ProbeLibrary",
    "load_probe_reference",
    "PtychoDataset",
    "Reconstruction",
    "default_probe_library_root",
    "object_pixel_size_m",
    "positions_m_to_px",
    "positions_px_to_m",
    "probe_array_sha256",
    "read_cxi",
    "read_dataset",
    "read_npz",
    "read_probe",
    "read_product",
    "wavelength_m",
    "write_cxi",
    "write_dataset",
    "write_npz",
]
