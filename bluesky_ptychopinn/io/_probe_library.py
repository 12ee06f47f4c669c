"""A directory of named probes with metadata: what the probe-centric workflow trains on."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, InvalidInputError
from ..physics import normalize_probe

__all__ = ["ProbeLibrary", "probe_array_sha256", "read_probe"]


def probe_array_sha256(probe: np.ndarray) -> str:
    """sha256 of the probe's complex64 C-ordered bytes."""
    return hashlib.sha256(np.ascontiguousarray(probe, np.complex64).tobytes()).hexdigest()


def read_probe(source) -> tuple[np.ndarray, dict]:
    """A probe from an array, .npy, our/PtychoPINN .npz, CXI or ptychodus product file."""
    if not isinstance(source, (str, Path)):
        return normalize_probe(np.asarray(source)), {"source": "array"}
    path = Path(source)
    if not path.is_file():
        raise FileFormatError(path, "", "no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return normalize_probe(np.load(path, allow_pickle=False)), {"source": str(path)}
        except ValueError as exc:
            raise FileFormatError(path, "", f"not a readable .npy ({exc})") from exc
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            for key in ("probe", "probeGuess"):
                if key in data:
                    meta = {"source": str(path)}
                    if "pixel_size_m" in data:
                        meta["pixel_size_m"] = float(data["pixel_size_m"])
                    return normalize_probe(data[key]), meta
        raise FileFormatError(path, "probe", "missing (looked for 'probe' and 'probeGuess')")
    import h5py

    with h5py.File(path, "r") as f:
        is_product = "probe" in f and "object" in f
    if is_product:
        from ._product import read_product

        rec = read_product(path)
        return normalize_probe(rec.probe), {"source": str(path), "pixel_size_m": rec.pixel_size_m,
                                            "energy_ev": rec.energy_ev}
    from ._cxi import read_cxi

    ds = read_cxi(path)
    return normalize_probe(ds.probe), {"source": str(path), "energy_ev": ds.energy_ev,
                                       "pixel_size_m": ds.object_pixel_size_m}


class ProbeLibrary:
    """Named probes in a directory: ``<name>.npz`` (probe + pixel size) and ``<name>.json``.

    Parameters
    ----------
    root : path, optional
        Default ``$PTYCHOPINN_PROBE_LIBRARY`` or ``~/.local/share/bluesky-ptychopinn/probes``.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        env = os.environ.get("PTYCHOPINN_PROBE_LIBRARY")
        default = Path.home() / ".local" / "share" / "bluesky-ptychopinn" / "probes"
        self.root = Path(root) if root else Path(env) if env else default

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise InvalidInputError(f"probe name {name!r}: use letters, digits, '-' and '_'")
        return self.root / f"{name}.npz", self.root / f"{name}.json"

    def add(self, name: str, probe, *, instrument: str = "", energy_ev: float | None = None,
            pixel_size_m: float | None = None, overwrite: bool = False) -> dict:
        """Store a probe (array or file) under ``name``; returns its metadata."""
        array, found = read_probe(probe)
        energy_ev = energy_ev if energy_ev is not None else found.get("energy_ev")
        pixel_size_m = pixel_size_m if pixel_size_m is not None else found.get("pixel_size_m")
        if not pixel_size_m:
            raise InvalidInputError(f"probe {name!r}: pixel size unknown; pass pixel_size_m")
        data_path, meta_path = self._paths(name)
        if data_path.exists() and not overwrite:
            raise InvalidInputError(f"probe {name!r} exists in {self.root}; use overwrite=True")
        self.root.mkdir(parents=True, exist_ok=True)
        np.savez(data_path, probe=array, pixel_size_m=np.float64(pixel_size_m))
        meta = {
            "name": name, "instrument": instrument, "energy_ev": energy_ev,
            "pixel_size_m": float(pixel_size_m), "shape": list(array.shape),
            "modes": int(array.shape[0]), "source": found.get("source", "array"),
            "sha256": probe_array_sha256(array),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        meta_path.write_text(json.dumps(meta, indent=2))
        return meta

    def list(self) -> list[dict]:
        if not self.root.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))]

    def get(self, name: str) -> tuple[np.ndarray, dict]:
        """The probe and its metadata; the sha256 is verified."""
        data_path, meta_path = self._paths(name)
        if not meta_path.is_file() or not data_path.is_file():
            known = ", ".join(m["name"] for m in self.list()) or "none"
            raise InvalidInputError(f"probe {name!r} not in {self.root} (known: {known})")
        meta = json.loads(meta_path.read_text())
        with np.load(data_path, allow_pickle=False) as data:
            probe = data["probe"]
        if probe_array_sha256(probe) != meta["sha256"]:
            raise FileFormatError(data_path, "probe", "sha256 does not match the library "
                                  "metadata: the file was modified or corrupted")
        return probe, meta

    def show(self, name: str) -> dict:
        return self.get(name)[1]

    def remove(self, name: str) -> None:
        for path in self._paths(name):
            path.unlink(missing_ok=True)
