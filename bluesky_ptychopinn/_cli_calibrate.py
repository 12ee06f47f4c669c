"""``bluesky-ptychopinn calibrate``: a calibration scan in, a probe-library entry out.

Registered on the ``bluesky-ptychopinn`` app by :mod:`bluesky_ptychopinn.cli`; the logic is in
:mod:`bluesky_ptychopinn.calibration` (docs/calibration.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["calibrate"]

#: Suffixes that make RUN_UID|FILE a file even when it does not exist (then: "no such file").
_FILE_SUFFIXES = (".cxi", ".h5", ".hdf5", ".nxs", ".npz")


def _is_file_argument(source: str) -> bool:
    path = Path(source)
    return path.exists() or path.suffix.lower() in _FILE_SUFFIXES or "/" in source


def _probe_guess(value: str | None, library, size: int, pixel_m: float | None):
    """``--probe-guess``: None (the scan's own), ``data`` (mean pattern), a library name or a
    probe file; resampled to the scan's sampling when its own pixel size is known."""
    from .errors import InvalidInputError
    from .io import load_probe_reference
    from .physics import probe_at_sampling

    if value is None:
        return None, None
    if value == "data":
        return "data", "estimated from the mean diffraction pattern (--probe-guess data)"
    probe, probe_pixel, what = load_probe_reference(value, library, flag="--probe-guess")
    if pixel_m is not None and (probe_pixel is not None or probe.shape[-1] != size):
        probe = probe_at_sampling(probe, probe_pixel, size, pixel_m)
    if probe.shape[-1] != size:
        raise InvalidInputError(f"--probe-guess {value!r}: {probe.shape[-1]} px, the frames have "
                                f"{size} px and its pixel size is unknown")
    return probe, what


def calibrate(
    source: str = typer.Argument(..., metavar="RUN_UID|FILE",
                                 help="A raw run uid in Tiled, or a CXI / NPZ file."),
    name: str = typer.Option(None, "--name", help="Library name of the probe (default: the "
                             "file's stem, or calib-<first 8 of the uid>)."),
    engine: str = typer.Option("rpie", "--engine", help="rpie, or lsqml (pty-chi, only when "
                               "the ptychi package is installed)."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Epochs of blind reconstruction."),
    modes: int = typer.Option(1, "--modes", min=1, max=16, help="Incoherent probe modes."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Positions per update."),
    probe_guess: str = typer.Option(None, "--probe-guess", metavar="data|NAME|FILE",
                                    help="Starting probe: 'data' (from the mean diffraction "
                                    "pattern), a library name or a probe file. Default: the "
                                    "file's probe or the run's ptycho.probe reference when there "
                                    "is one, else 'data'."),
    tiled: str = typer.Option(None, "--tiled", envvar="TILED_URI",
                              help="Tiled URI for a RUN_UID (default: $TILED_URI, else the "
                              "embedded catalog in --data-dir)."),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="API key of the --tiled server (default: $TILED_API_KEY)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Embedded catalog directory when no "
                                  "--tiled (default: $PTYCHOPINN_DATA or "
                                  "~/.local/share/bluesky-ptychopinn/tiled)."),
    root: Path = typer.Option(None, "--root", help="Probe library directory (default: "
                              "$PTYCHOPINN_PROBE_LIBRARY or "
                              "~/.local/share/bluesky-ptychopinn/probes)."),
    instrument: str = typer.Option("", "--instrument", help="Instrument / beamline."),
    png: Path = typer.Option(None, "--png", help="Figure of probe modes, object and error "
                             "curve (default: NAME_calibration.png in the library directory)."),
    pixel_m: float = typer.Option(None, "--pixel-m", help="Object pixel size (m) when the file "
                                  "has no detector geometry."),
    energy_ev: float = typer.Option(None, "--energy-ev", help="Photon energy (eV) to record when "
                                    "the file has none."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    seed: int = typer.Option(0, "--seed", help="Seed of the order of positions."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing probe of "
                                   "that name (and its PNG)."),
) -> None:
    """Calibrate the beamline's probe: reconstruct a calibration scan blind (rPIE, probe
    refined), store the probe in the library with its provenance and draw a figure.

    Then `train --probe NAME` trains a model for it; scans that reference it start from it.
    """
    import sys

    from ._workflows import check_device
    from .calibration import (
        CALIBRATION_ENGINES,
        calibrate_probe,
        check_outputs,
        ptychi_available,
        save_calibration,
        scan_from_file,
        scan_from_run,
    )
    from .cli import _fail, _tiled_client, console
    from .errors import InvalidInputError, PtychoError
    from .io import ProbeLibrary

    server = None
    try:
        if engine not in CALIBRATION_ENGINES:
            raise InvalidInputError(f"--engine: expected one of {', '.join(CALIBRATION_ENGINES)}, "
                                    f"got {engine!r}")
        if engine == "lsqml" and not ptychi_available():
            raise InvalidInputError("--engine lsqml needs pty-chi (the ptychi package), which is "
                                    "not installed: pip install ptychi, or use --engine rpie")
        check_device(device)  # before minutes of work (shared with reconstruct and worker)
        is_file = _is_file_argument(source)
        if name is None:
            name = Path(source).stem if is_file else f"calib-{source[:8]}"
        library = ProbeLibrary(root)
        png = png if png is not None else library.root / f"{name}_calibration.png"
        try:
            check_outputs(library, name, png, overwrite)  # before minutes of work
        except InvalidInputError as exc:
            raise InvalidInputError(f"--name: {exc}") from None
        if is_file:
            try:
                scan = scan_from_file(source)
            except PtychoError as exc:
                raise InvalidInputError(f"RUN_UID|FILE: {exc}") from None
        else:
            client, server = _tiled_client(tiled, api_key, data_dir)
            try:
                scan = scan_from_run(client, source, library=library)
            except PtychoError as exc:
                hint = "" if tiled else " (the embedded catalog; pass --tiled URI or --data-dir)"
                raise InvalidInputError(f"RUN_UID|FILE: {exc}{hint}") from None
        if pixel_m is not None:
            scan.pixel_size_m = float(pixel_m)
        if energy_ev is not None:
            scan.energy_ev = float(energy_ev)
        if scan.pixel_size_m is None:
            raise InvalidInputError(f"{source}: the object pixel size is unknown (no detector "
                                    "geometry); pass --pixel-m")
        guess, guess_source = _probe_guess(probe_guess, library, scan.frame_size,
                                           scan.pixel_size_m)
        if guess is None:
            guess, guess_source = scan.probe_guess, scan.probe_guess_source
        elif isinstance(guess, str):  # "data"
            guess = None
        console.print(f"calibrating {name!r} from {source}: {len(scan.frames)} frames of "
                      f"{scan.frame_size} px, {engine}, {epochs} epochs, probe guess "
                      f"{guess_source}", highlight=False, soft_wrap=True)
        result = calibrate_probe(
            scan.frames, scan.positions_px, probe_guess=guess, probe_guess_source=guess_source,
            mask=scan.mask, engine=engine, epochs=epochs, n_modes=modes, batch_size=batch_size,
            seed=seed, device=None if device == "auto" else device, progress=sys.stderr.isatty(),
        )
        meta = save_calibration(result, scan, name, library=library, instrument=instrument,
                                overwrite=overwrite, png=png)
    except PtychoError as exc:
        _fail(exc)
    except FloatingPointError as exc:  # rPIE diverged: a smaller batch steadies it
        _fail(InvalidInputError(f"{exc}; or try a smaller --batch-size"))
    finally:
        if server is not None:
            server.stop()
    console.print(f"stored probe {name!r} in {library.root} (final Fourier error "
                  f"{result.final_error:.3e}, {result.seconds:.1f} s); figure {png}",
                  highlight=False, soft_wrap=True)
    print(json.dumps({"name": name, "library": str(library.root), "sha256": meta["sha256"],
                      "png": str(png), **{k: meta["provenance"][k] for k in (
                          "engine", "epochs", "final_fourier_error", "frames", "seconds")}},
                     indent=2))
