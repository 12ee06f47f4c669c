"""A simulated ptychography area detector (ophyd v1) that writes frames like a real one.

Each exposure computes the far-field pattern of a hidden sample at the current stage position
(physics package), draws Poisson counts, and either appends the frame to an HDF5 file opened in
SWMR mode at ``stage()`` (StreamResource / StreamDatum documents point at it, as for an
area detector's HDF5 plugin) or, in inline mode, returns the image in the event itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from pathlib import Path

import h5py
import numpy as np
import torch
from event_model import ComposeStreamResource, StreamRange
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import DeviceStatus

from ..physics import (
    diffraction_intensity,
    extract_patches,
    normalize_probe,
    stage_to_pixels,
)

__all__ = ["PtychoDetector", "HDF5_DATASET"]

#: Dataset path inside the detector's files (the NeXus/area-detector convention).
HDF5_DATASET = "/entry/data/data"


class PtychoDetector(Device):
    """Simulated far-field detector looking at a hidden sample through a probe.

    Parameters
    ----------
    name : str
        Device name; the image field is ``f"{name}_image"``.
    stage : SampleStage
        Where the sample is (metres); read at every trigger.
    sample : numpy.ndarray
        complex (H, W) hidden object (transmission function).
    probe : numpy.ndarray
        (M, N, N) probe at the object pixel size (normalised internally).
    pixel_size_m : float
        Object pixel size (m); stage metres -> object pixels through
        :func:`~bluesky_ptychopinn.physics.stage_to_pixels` with the stage origin at the sample
        centre.
    photon_flux : float
        Incident photons per second; a frame holds ``photon_flux * exposure`` photons.
    write_path : path or None
        Directory for HDF5 files; ``None`` = inline mode (images inside events).
    seed : int
        Noise seed.
    dtype : str
        Frame dtype (``uint32`` like a photon-counting detector; a float type for tests that
        inject NaN frames).
    """

    exposure_time = Cpt(Signal, value=0.01, kind="config")
    photon_flux = Cpt(Signal, value=1e7, kind="config")
    frames_written = Cpt(Signal, value=0, kind="omitted")

    def __init__(
        self,
        *,
        name: str,
        stage,
        sample: np.ndarray,
        probe: np.ndarray,
        pixel_size_m: float,
        photon_flux: float = 1e7,
        write_path: str | Path | None = None,
        seed: int = 0,
        dead_time: float = 0.0,
        dtype: str = "uint32",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.sample_stage = stage
        self._sample = torch.as_tensor(np.asarray(sample, dtype=np.complex64))
        self._probe = torch.from_numpy(normalize_probe(probe))
        self.pixel_size_m = float(pixel_size_m)
        self.frame_size = int(self._probe.shape[-1])
        self.photon_flux.put(float(photon_flux))
        self.write_path = Path(write_path) if write_path is not None else None
        self.dead_time = float(dead_time)
        self.dtype = np.dtype(dtype)
        self._rng = torch.Generator().manual_seed(seed)
        self._image = np.zeros((self.frame_size, self.frame_size), np.float32)
        self._file: h5py.File | None = None
        self._dataset = None
        self._asset_docs: deque = deque()
        self._resource_bundle = None
        self._last_emitted = 0
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._hdf5_path: Path | None = None

    # -- geometry -------------------------------------------------------------------------
    @property
    def image_key(self) -> str:
        return f"{self.name}_image"

    @property
    def sample_origin_px(self) -> tuple[float, float]:
        """Object pixel under the stage origin (the sample centre)."""
        h, w = self._sample.shape
        return ((h - 1) / 2, (w - 1) / 2)

    def position_px(self, y_m: float, x_m: float) -> np.ndarray:
        return stage_to_pixels([[y_m, x_m]], self.pixel_size_m, origin_px=self.sample_origin_px)[0]

    def _compute_frame(self) -> np.ndarray:
        y_m = float(self.sample_stage.y.position)
        x_m = float(self.sample_stage.x.position)
        pos = torch.as_tensor(self.position_px(y_m, x_m)[None], dtype=torch.float32)
        patch = extract_patches(self._sample, pos, self.frame_size)
        expected = diffraction_intensity(self._probe, patch)[0]
        photons = float(self.photon_flux.get()) * float(self.exposure_time.get())
        counts = torch.poisson(expected.double() * photons, generator=self._rng).numpy()
        if self.dtype.kind in "iu":  # a real detector saturates; a cast would wrap around
            counts = np.minimum(counts, np.iinfo(self.dtype).max)
        return counts.astype(self.dtype)

    # -- ophyd API ------------------------------------------------------------------------
    def stage(self):
        # ophyd's own checks first: staging twice raises before a second file is opened
        # (the first would stay open, in SWMR mode, past unstage).
        staged = super().stage()
        if self.write_path is not None:
            self.write_path.mkdir(parents=True, exist_ok=True)
            self._hdf5_path = self.write_path / f"{self.name}_{time.strftime('%Y%m%d-%H%M%S')}_" \
                f"{next(self._counter):03d}_{id(self) & 0xFFFF:04x}.h5"
            n = self.frame_size
            self._file = h5py.File(self._hdf5_path, "w", libver="latest")
            self._dataset = self._file.create_dataset(
                HDF5_DATASET, shape=(0, n, n), maxshape=(None, n, n), dtype=self.dtype,
                chunks=(1, n, n),
            )
            self._file.swmr_mode = True
            self._resource_bundle = ComposeStreamResource()(
                mimetype="application/x-hdf5",
                uri=self._hdf5_path.resolve().as_uri().replace("file:///", "file://localhost/"),
                data_key=self.image_key,
                parameters={"dataset": HDF5_DATASET, "chunk_shape": (1, n, n), "swmr": True},
            )
            self._asset_docs.append(("stream_resource", self._resource_bundle.stream_resource_doc))
            self._last_emitted = 0
        self.frames_written.put(0)
        return staged

    def unstage(self):
        try:
            return super().unstage()
        finally:
            with self._lock:  # an exposure still running must not write to a closing file
                if self._file is not None:
                    self._file.close()
                    self._file = None
                    self._dataset = None

    def trigger(self) -> DeviceStatus:
        status = DeviceStatus(self)

        def expose():
            try:
                if self.dead_time:
                    time.sleep(self.dead_time)
                frame = self._compute_frame()
                with self._lock:
                    if self._dataset is not None:
                        index = self._dataset.shape[0]
                        self._dataset.resize(index + 1, axis=0)
                        self._dataset[index] = frame
                        self._dataset.flush()
                        self.frames_written.put(index + 1)
                        self._asset_docs.append(("stream_datum",
                                                 self._resource_bundle.compose_stream_datum(
                                                     indices=StreamRange(start=index,
                                                                         stop=index + 1))))
                    self._image = frame
                status.set_finished()
            except Exception as exc:  # report through the status, never kill the thread quietly
                status.set_exception(exc)

        threading.Thread(target=expose, daemon=True, name=f"{self.name}-expose").start()
        return status

    def describe(self):
        n = self.frame_size
        desc = super().describe()
        desc[self.image_key] = {
            "source": f"SIM:{self.name}" if self.write_path is None else f"HDF5:{self.name}",
            "dtype": "array",
            "dtype_numpy": self.dtype.str,
            "shape": [n, n],
            "dims": ["detector_y", "detector_x"],
            "units": "counts",
        }
        if self.write_path is not None:
            # One frame per event, stacked along the file's first axis by consumers.
            desc[self.image_key]["external"] = "STREAM:"
        return desc

    def read(self):
        reading = super().read()
        if self.write_path is None:
            reading[self.image_key] = {"value": self._image, "timestamp": time.time()}
        return reading

    # -- stream-asset protocol (bluesky.protocols.WritesStreamAssets) ----------------------
    def get_index(self) -> int:
        return int(self.frames_written.get())

    def collect_asset_docs(self, index: int | None = None):
        with self._lock:
            while self._asset_docs:
                yield self._asset_docs.popleft()
