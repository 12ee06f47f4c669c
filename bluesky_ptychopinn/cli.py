"""The ``bluesky-ptychopinn`` command: one entry point, one sub-command per job.

Heavy imports (torch, bluesky, tiled) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import InvalidInputError, PtychoError

app = typer.Typer(
    name="bluesky-ptychopinn",
    help="Physics-informed neural-network ptychography for Bluesky beamlines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
probes_app = typer.Typer(help="Manage the probe library.", no_args_is_help=True)
app.add_typer(probes_app, name="probes")
models_app = typer.Typer(help="Trained models: the shipped default and your own.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
bus_app = typer.Typer(help="The message bus (NATS JetStream) for remote workers.",
                      no_args_is_help=True)
app.add_typer(bus_app, name="bus")
spool_app = typer.Typer(help="Documents spooled to disk while Tiled was unreachable.",
                        no_args_is_help=True)
app.add_typer(spool_app, name="spool")

console = Console(stderr=True)


def _tiled_client(tiled: str | None, api_key: str | None, data_dir: Path | None):
    """``(client, server)``: a client of ``--tiled``, else of an embedded catalog in
    ``data_dir`` started here (it may read the detector files beside it); stop the server
    when done (``None`` for ``--tiled``)."""
    from .catalog import EmbeddedTiled, connect

    if tiled:
        return connect(tiled, api_key=api_key), None
    readable = [data_dir.parent / "detector"] if data_dir is not None else []
    server = EmbeddedTiled(data_dir, readable=readable).start()
    return server.client(), server


def _fail(exc: Exception) -> None:
    # soft_wrap: one line whatever the terminal width (scripts grep it; rich would wrap at 80)
    # escape: a message with [brackets] (a list, a path) must not be read as rich markup
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


def _os_error(exc: OSError) -> InvalidInputError:
    """A file-system failure (full disk, permissions, a path that vanished) as one line: the
    path and the system's reason, not a traceback. The commands check their outputs first;
    this is for what can still fail while writing."""
    where = f"{exc.filename}: " if exc.filename else ""
    return InvalidInputError(f"{where}{exc.strerror or exc}")


@app.command("import")
def import_(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="HDF5 or NPZ file."),
    dst: Path = typer.Argument(..., help="The project's CXI (or NPZ) to write."),
    frames: str = typer.Option(None, "--frames", help="Key of the (n, N, N) frames."),
    positions: str = typer.Option(None, "--positions", help="Key of the (n, 2) positions."),
    probe: str = typer.Option(None, "--probe", help="Key of the probe (default: estimated "
                              "from the mean pattern)."),
    frames_are: str = typer.Option("counts", "--frames-are", help="counts or amplitude."),
    dc: str = typer.Option("centre", "--dc", help="Zero frequency at the centre or corner."),
    positions_are: str = typer.Option("centre", "--positions-are",
                                      help="Probe centres, or the window's top-left corner."),
    units: str = typer.Option("m", "--units", help="Positions in m or px (object pixels)."),
    xy: bool = typer.Option(False, "--xy", help="Positions are (x, y) per row, not (y, x)."),
    energy_ev: float = typer.Option(None, "--energy-ev", help="Photon energy, eV."),
    distance_m: float = typer.Option(None, "--distance-m", help="Sample-detector distance."),
    detector_pixel_m: float = typer.Option(None, "--detector-pixel-m",
                                           help="Detector pixel size, m."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing DST."),
) -> None:
    """Convert a foreign layout to the project's conventions (docs/own-data.md); without
    --frames/--positions, list the file's arrays."""
    from .errors import InvalidInputError, OutputExistsError
    from .io import write_dataset
    from .io._import import import_arrays, list_arrays

    try:
        if not frames or not positions:
            for key, shape in list_arrays(src).items():
                console.print(f"{key}  {shape}", highlight=False)
            raise InvalidInputError("pass --frames KEY and --positions KEY (the arrays are "
                                    "listed above)")
        missing = [flag for flag, v in (("--energy-ev", energy_ev), ("--distance-m", distance_m),
                                        ("--detector-pixel-m", detector_pixel_m)) if v is None]
        if missing:
            raise InvalidInputError(f"the geometry is needed: pass {', '.join(missing)}")
        if dst.exists() and not overwrite:
            raise OutputExistsError(f"{dst} exists; choose another DST or pass --overwrite")
        ds = import_arrays(src, frames=frames, positions=positions, probe=probe,
                           frames_are=frames_are, dc=dc, positions_are=positions_are,
                           units=units, yx=not xy, energy_ev=energy_ev, distance_m=distance_m,
                           detector_pixel_m=detector_pixel_m)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_dataset(ds, dst)
    except PtychoError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    for line in ds.metadata["conversions"]:
        console.print(f"- {line}", highlight=False)
    console.print(f"wrote {dst} ({len(ds.positions_px)} frames of {ds.frame_size} px)")


@app.command()
def simulate(
    output: Path = typer.Argument(..., help="File to write (.cxi or .npz)."),
    obj: str = typer.Option("dead_leaves", "--object", help="Object class or built-in sample."),
    probe: str = typer.Option("zone_plate", help="Probe model (zone_plate, airy, pinhole, kb, "
                              "mixed) or a probe-library name."),
    pattern: str = typer.Option("fermat", help="Scan pattern: fermat, raster, jittered_raster, "
                                "concentric."),
    frame_size: int = typer.Option(64, "--frame-size", "-N", help="Detector frame size N."),
    object_size: int = typer.Option(256, help="Object canvas side in pixels."),
    overlap: float = typer.Option(0.75, help="Linear overlap ratio of neighbouring probes."),
    photons: float = typer.Option(1e6, help="Incident photons per frame."),
    beamstop: float = typer.Option(0.0, help="Beamstop radius in detector pixels."),
    energy_ev: float = typer.Option(8_800.0, help="Photon energy (eV)."),
    distance_m: float = typer.Option(1.5, help="Sample-detector distance (m)."),
    pixel_m: float = typer.Option(75e-6, help="Detector pixel size (m)."),
    seed: int = typer.Option(0, help="Random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUTPUT."),
) -> None:
    """Simulate a ptychography experiment with known truth and write it to a file (its
    directory is created; an existing file is kept unless --overwrite)."""
    from ._workflows import prepare_output
    from .errors import OutputExistsError
    from .io import ProbeLibrary, write_dataset
    from .physics import PROBE_MODELS, ExperimentGeometry
    from .synthetic import simulate_experiment

    try:
        if output.suffix.lower() not in (".npz", ".cxi", ".h5", ".hdf5", ".nxs"):
            raise InvalidInputError(f"OUTPUT {output}: expected a .cxi, .h5 or .npz file")
        prepare_output(output, flag="OUTPUT")  # as reconstruct: parents made, checked first
        if output.exists() and not overwrite:  # it may be a measurement: never replaced silently
            raise OutputExistsError(f"{output} exists; choose another OUTPUT or pass "
                                    "--overwrite")
        geometry = ExperimentGeometry(energy_ev, distance_m, pixel_m, frame_size)
        probe_arg = probe
        if probe not in PROBE_MODELS:
            probe_arg, _ = ProbeLibrary().get(probe)
        ds = simulate_experiment(
            obj, probe_arg, geometry=geometry, object_shape=(object_size, object_size),
            pattern=pattern, overlap=overlap, photons=photons, beamstop_px=beamstop, seed=seed,
        )
        write_dataset(ds, output)
    except PtychoError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(_os_error(exc))
    console.print(
        f"wrote {output}: {ds.diffraction.shape[0]} frames of {frame_size}x{frame_size}, "
        f"object {ds.object.shape}, pixel {ds.object_pixel_size_m * 1e9:.1f} nm"
    )


@app.command()
def reconstruct(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="CXI or NPZ dataset."),
    engine: str = typer.Option(None, help="Iterative engine: epie or rpie (default rpie); "
                               "with --model, the engine of --refine."),
    epochs: int = typer.Option(50, help="Epochs of the iterative engine."),
    probe_update: bool = typer.Option(True, help="Refine the probe too."),
    output: Path = typer.Option(None, "--output", "-o", help="Result file (.cxi or .npz); "
                                "default FILE_recon.cxi beside the input."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    seed: int = typer.Option(0, help="Random seed."),
    model: str = typer.Option(None, help="Reconstruct with a trained network (name or "
                              "directory) instead of an iterative engine."),
    refine: bool = typer.Option(False, help="With --model: refine the network's image with "
                                "--engine (rPIE by default) for --epochs (or --refine-seconds) "
                                "and keep the estimate that explains the frames better."),
    refine_seconds: float = typer.Option(None, "--refine-seconds",
                                         help="With --refine: stop refining after this long."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing output (and its PNG and JSON)."),
    crop: str = typer.Option(None, help="With --model: side (px) of the central region of "
                             "each predicted patch that is stitched, or 'auto' (the default): "
                             "the size whose stitched object best explains the frames."),
    batch_size: int = typer.Option(None, "--batch-size", min=1,
                                   help="Positions per rPIE/ePIE update (default 16)."),
    alpha: float = typer.Option(None, help="Object alpha: rPIE's regularisation weight in "
                                "(0, 1] (default 0.1), ePIE's step (default 1)."),
    energy_ev: float = typer.Option(None, "--energy-ev",
                                    help="Photon energy (eV) when the file has none or a "
                                    "wrong one."),
    pixel_m: float = typer.Option(None, "--pixel-m", help="Object pixel size (m) when the file "
                                  "has no detector geometry."),
    probe: str = typer.Option(None, help="Use this probe (a library name, e.g. from "
                              "`calibrate`, or a probe file) instead of the file's, resampled "
                              "to the frames' size and pixel."),
    include_frames: bool = typer.Option(False, "--include-frames",
                                        help="Also store the frames in an NPZ result (CXI "
                                        "results always hold the frames reconstructed)."),
    correct_positions: bool = typer.Option(False, "--correct-positions",
                                           help="Also correct each frame's position (encoder "
                                           "errors, stage jitter); the corrected positions "
                                           "are written."),
) -> None:
    """Reconstruct a dataset (ePIE/rPIE, or a network with --model); write the result, a PNG
    with amplitude, phase, probe and FRC curves when the file holds a ground truth.

    The result holds the object, the probe at the object's sampling and the positions on the
    object's grid, with its pixel size and canvas origin (a model of a smaller N works on
    centre-cropped frames, hence a coarser pixel).
    """
    from ._workflows import json_safe, run_reconstruction

    # --crop defaults to "auto" only with --model: given without it, it is refused, not ignored
    crop_value = _crop_option(crop) if crop is not None else ("auto" if model else None)
    try:
        summary = run_reconstruction(
            file, engine=engine, epochs=epochs, probe_update=probe_update, output=output,
            device=device, seed=seed, model=model, refine=refine,
            refine_seconds=refine_seconds, overwrite=overwrite, crop=crop_value,
            batch_size=batch_size, alpha=alpha, energy_ev=energy_ev, pixel_m=pixel_m,
            include_frames=include_frames, probe=probe, correct_positions=correct_positions,
        )
    except PtychoError as exc:
        _fail(exc)
    except FloatingPointError as exc:  # rPIE/ePIE diverged: one line, as `calibrate` says it
        _fail(_diverged(exc))
    except OSError as exc:
        _fail(_os_error(exc))
    # strict JSON on stdout (jq and friends reject a bare NaN)
    print(json.dumps(json_safe(summary), indent=2, allow_nan=False))


def _diverged(exc: FloatingPointError) -> InvalidInputError:
    """The one-line error of an iterative engine that diverged, with the options that steady
    it (the engines name their own parameters, alpha_object / alpha_probe)."""
    return InvalidInputError(f"{exc}; on the command line: a smaller --alpha or --batch-size")


def _crop_option(value: str | None) -> int | str | None:
    """``--crop``: a positive number of pixels or ``auto``."""
    if value is None or value == "auto":
        return value
    try:
        crop = int(value)
    except ValueError:
        crop = 0
    if crop < 1:
        raise typer.BadParameter(f"expected a positive number of pixels or 'auto', got {value!r}",
                                 param_hint="--crop")
    return crop


@probes_app.command("list")
def probes_list(
    root: Path = typer.Option(None, help="Library directory (default: $PTYCHOPINN_PROBE_LIBRARY "
                              "or ~/.local/share/bluesky-ptychopinn/probes)."),
) -> None:
    """List the probes in the library."""
    from .io import ProbeLibrary

    library = ProbeLibrary(root)
    table = Table(title=f"probe library {library.root}")
    for column in ("name", "instrument", "energy (eV)", "pixel (nm)", "shape", "sha256"):
        table.add_column(column)
    for meta in library.list():
        table.add_row(
            meta["name"], str(meta.get("instrument", "")), _number(meta.get("energy_ev")),
            f"{meta.get('pixel_size_m', 0) * 1e9:.2f}", "x".join(map(str, meta["shape"])),
            meta["sha256"][:12],
        )
    Console().print(table)


def _number(value) -> str:
    return "unknown" if value is None else f"{value:g}"


@probes_app.command("show")
def probes_show(
    name: str = typer.Argument(..., help="Probe name."),
    root: Path = typer.Option(None, help="Library directory."),
    png: Path = typer.Option(None, help="Also save a PNG of the probe modes."),
) -> None:
    """Show one probe's metadata (and optionally a picture)."""
    from .io import ProbeLibrary

    try:
        probe, meta = ProbeLibrary(root).get(name)
    except PtychoError as exc:
        _fail(exc)
    print(json.dumps(meta, indent=2))
    if png is not None:
        from .figures import probe_figure

        probe_figure(probe, png, title=name)
        console.print(f"wrote {png}")


@probes_app.command("add")
def probes_add(
    name: str = typer.Argument(..., help="Name in the library."),
    source: str = typer.Argument(..., help="A file (.npy, .npz, .cxi, ptychodus .h5) or a model "
                                 "name (zone_plate, airy, pinhole, kb, mixed)."),
    instrument: str = typer.Option("", help="Instrument / beamline."),
    energy_ev: float = typer.Option(None, help="Photon energy (eV); read from the file if there."),
    pixel_m: float = typer.Option(None, "--pixel-m",
                                  help="Object pixel size (m) the probe is sampled at; read from "
                                  "the file if there."),
    frame_size: int = typer.Option(None, "--frame-size", "-N",
                                   help="Pixels: of a model probe (default 64); a file's probe is "
                                   "resampled to N px of the same field of view (the probe for "
                                   "frames centre-cropped to N)."),
    root: Path = typer.Option(None, help="Library directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing probe."),
) -> None:
    """Add a probe to the library from a file or from a probe model."""
    from .io import ProbeLibrary, read_probe
    from .physics import PROBE_MODELS, ExperimentGeometry, make_probe, probe_at_sampling

    try:
        if frame_size is not None and frame_size < 1:
            # 0 would divide by zero in the resampling, or silently become the default 64
            raise InvalidInputError(f"--frame-size {frame_size}: expected a positive number "
                                    "of pixels")
        library = ProbeLibrary(root)
        if source in PROBE_MODELS:
            geometry = ExperimentGeometry(energy_ev or 8_800.0, frame_size=frame_size or 64)
            pixel = pixel_m or geometry.object_pixel_size_m
            probe = make_probe(source, geometry.frame_size, pixel, geometry.energy_ev)
            meta = library.add(name, probe, instrument=instrument or f"simulated {source}",
                               energy_ev=geometry.energy_ev, pixel_size_m=pixel,
                               overwrite=overwrite)
        else:
            probe, info = read_probe(source)
            pixel = pixel_m if pixel_m is not None else info.get("pixel_size_m")
            if pixel is None:
                raise InvalidInputError(f"{source} does not give the probe's pixel size: "
                                        "give it with --pixel-m")
            n, provenance = probe.shape[-1], None
            if frame_size is not None and frame_size != n:
                probe = probe_at_sampling(probe, pixel, frame_size, pixel * n / frame_size)
                provenance = {"resampled": f"{n} px of {pixel:.4g} m -> {frame_size} px of "
                              f"{pixel * n / frame_size:.4g} m (Fourier crop, same field of "
                              "view)"}
                console.print(provenance["resampled"], highlight=False)
                pixel = pixel * n / frame_size
            meta = library.add(name, probe, instrument=instrument,
                               energy_ev=energy_ev if energy_ev is not None
                               else info.get("energy_ev"), pixel_size_m=pixel,
                               overwrite=overwrite, source=info["source"],
                               provenance=provenance)
    except PtychoError as exc:
        _fail(exc)
    except OSError as exc:  # writing the library (full disk, permissions)
        _fail(_os_error(exc))
    console.print(f"added {meta['name']} ({'x'.join(map(str, meta['shape']))}, pixel "
                  f"{meta['pixel_size_m']:.3g} m) to {library.root}", highlight=False)


@app.command()
def dataset(
    out_dir: Path = typer.Argument(..., help="Output directory."),
    probes: list[str] = typer.Option(["zone_plate", "airy", "kb", "mixed"], "--probe",
                                     help="Probe models or library names (repeat)."),
    classes: list[str] = typer.Option(
        ["dead_leaves", "blurred_white_noise", "procedural", "simplex"], "--class",
        help="Object classes (repeat)."),
    patterns_per_object: int = typer.Option(7_000, help="Diffraction patterns per object."),
    objects_per_class: int = typer.Option(1, help="Objects per class and probe."),
    file_format: str = typer.Option("npz", "--format", help="npz or cxi."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Build a probe-centric synthetic training set (the paper's recipe by default)."""
    from .io import ProbeLibrary
    from .physics import PROBE_MODELS, ExperimentGeometry, make_probe
    from .synthetic import build_dataset

    geometry = ExperimentGeometry()
    library = None
    probe_arrays = {}
    try:
        for name in probes:
            if name in PROBE_MODELS:
                probe_arrays[name] = make_probe(
                    name, geometry.frame_size, geometry.object_pixel_size_m, geometry.energy_ev
                )
            else:
                library = library or ProbeLibrary()
                probe_arrays[name] = library.get(name)[0]
        paths = build_dataset(
            out_dir, probe_arrays, classes, objects_per_class=objects_per_class,
            patterns_per_object=patterns_per_object, geometry=geometry, file_format=file_format,
            seed=seed,
        )
    except PtychoError as exc:
        _fail(exc)
    console.print(f"wrote {len(paths)} experiments to {out_dir} (manifest.json lists them)")


@models_app.command("list")
def models_list(root: Path = typer.Option(None, help="User model directory.")) -> None:
    """List models (user directory first, then the ones shipped with the package)."""
    from .models import ModelRegistry

    table = Table(title="models")
    for column in ("name", "N", "C", "width", "parameters", "sha256", "path"):
        table.add_column(column)
    for card in ModelRegistry(root).list():
        arch = card.get("architecture", {})
        table.add_row(card["name"], str(arch.get("frame_size", "?")),
                      str(arch.get("channels", "?")), str(arch.get("base_width", "?")),
                      str(card.get("n_parameters", "?")), str(card.get("sha256", ""))[:12],
                      card["path"])
    Console().print(table)


@models_app.command("show")
def models_show(name: str = typer.Argument("default"),
                root: Path = typer.Option(None, help="User model directory.")) -> None:
    """Print a model's card (architecture, training data, metrics)."""
    from .models import ModelRegistry, read_model_card

    try:
        card = read_model_card(ModelRegistry(root).path(name))
    except PtychoError as exc:
        _fail(exc)
    history = card.get("provenance", {}).get("training", {}).pop("history", None)
    if history:
        card["provenance"]["training"]["final_epoch"] = history[-1]
    print(json.dumps(card, indent=2, default=str))


def _verify_status(identity) -> str:
    if identity.verified:
        return "ok"
    if not identity.weights_sha256_verified:
        return "MODIFIED weights (sha256 differs from the card)"
    return "unsigned or MODIFIED card (sha256 differs from its card_sha256)"


@models_app.command("verify")
def models_verify(names: list[str] = typer.Argument(None, help="Model names or directories "
                                                    "(default: every model found)."),
                  root: Path = typer.Option(None, help="User model directory.")) -> None:
    """Check each model's weights and card against their recorded hashes (exit 1 if any
    differs)."""
    from .models import ModelRegistry, verify_model

    registry = ModelRegistry(root)
    bad = 0
    for name in names or [card["path"] for card in registry.list()]:
        try:
            identity = verify_model(registry.path(name))
            status = f"{_verify_status(identity)} (model sha256 {identity.sha256[:16]}...)"
        except PtychoError as exc:
            status = f"error: {exc}"
        bad += not status.startswith("ok ")
        print(f"{name}: {status}")
    if bad:
        console.print(f"{bad} model(s) not verified; after checking one, accept it with "
                      "`bluesky-ptychopinn models sign DIR`", soft_wrap=True)
        raise typer.Exit(code=1)


@models_app.command("sign")
def models_sign(name: str = typer.Argument(..., help="Model name or directory."),
                root: Path = typer.Option(None, help="User model directory."),
                accept_weights: bool = typer.Option(
                    False, help="Also accept weights that differ from the card's sha256.")
                ) -> None:
    """Accept a model's card as it is now (records its card_sha256): for a model saved before
    cards were signed, or a card edited on purpose. Check the model first."""
    from .models import ModelRegistry, sign_model

    try:
        path = ModelRegistry(root).path(name)
        identity = sign_model(path, accept_weights=accept_weights)
    except (PtychoError, OSError) as exc:
        _fail(exc)
    print(f"signed {path}: model sha256 {identity.sha256}")


@app.command()
def train(
    output: Path = typer.Argument(..., help="Model directory to write (safetensors + JSON)."),
    probe: list[str] = typer.Option(["zone_plate"], "--probe",
                                    help="Probe models or library names (repeat: multi-probe)."),
    experiment: list[Path] = typer.Option([], "--experiment",
                                          help="Experimental NPZ/CXI files (unsupervised) "
                                          "instead of synthetic data (repeat)."),
    classes: list[str] = typer.Option(
        ["dead_leaves", "blurred_white_noise", "procedural", "simplex"], "--class",
        help="Synthetic object classes (repeat)."),
    objects_per_class: int = typer.Option(4, help="Synthetic objects per class and probe."),
    object_size: int = typer.Option(160, help="Synthetic object side, pixels."),
    step_px: float = typer.Option(4.0, help="Scan step of the synthetic experiments, pixels."),
    photons: tuple[float, float] = typer.Option((1e5, 1e6), help="Photons per frame, range."),
    contrast: tuple[float, float] = typer.Option(
        (0.1, 1.0), help="Contrast augmentation: phase span pi*U(LO, HI); '1 1' = full."),
    threads: int = typer.Option(None, help="torch threads (default: torch's)."),
    frame_size: int = typer.Option(64, "--frame-size", "-N", help="Model N (frames are cropped)."),
    channels: int = typer.Option(4, help="C: 4 (overlap constraint) or 1."),
    base_width: int = typer.Option(8, help="Width of the first encoder block."),
    epochs: int = typer.Option(16, help="Epochs."),
    finetune_epochs: int = typer.Option(2, help="Extra epochs with the encoder frozen."),
    batch_size: int = typer.Option(16, help="Groups per batch."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    loss: str = typer.Option("poisson", help="poisson, mae, or supervised (baseline)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    resume: bool = typer.Option(True, help="Resume from OUTPUT/checkpoint if present."),
    seed: int = typer.Option(0, help="Random seed."),
    register: str = typer.Option(None, help="Also register the model under this name in the "
                                 "user model directory ($PTYCHOPINN_MODELS), where "
                                 "`--model NAME` and LiveReconstruction(model='auto') find it."),
) -> None:
    """Train a model: probe-centric synthetic data (default) or experimental files.

    Run under `torchrun --nproc_per_node K` for multi-GPU / multi-node DDP.
    """
    import numpy as np
    import torch

    from .io import ProbeLibrary, read_dataset
    from .models import ModelRegistry, ptychopinn, save_model
    from .physics import PROBE_MODELS, ExperimentGeometry, make_probe, resample_probe
    from .training import GroupedSamples, TrainConfig, TrainingExperiment
    from .training import train as run_training
    from .training._recipe import ProbeCentricRecipe, train_probe_centric

    registry = ModelRegistry()
    if register is not None and (registry.root / register).exists():
        _fail(InvalidInputError(f"--register {register}: {registry.root / register} exists; "
                                "choose another name"))
    if threads:
        torch.set_num_threads(int(threads))
    checkpoint = output / "checkpoint"
    resumed = bool(resume and checkpoint.is_dir() and any(checkpoint.iterdir()))
    extra = {"checkpoint_dir": str(checkpoint) if resume else None,
             "log_csv": str(output / "training.csv")}
    try:
        output.mkdir(parents=True, exist_ok=True)
        if experiment:
            experiments = [TrainingExperiment.from_dataset(read_dataset(p), frame_size,
                                                           name=p.stem) for p in experiment]
            grouping = "quadrant" if channels == 4 else "single"
            data = GroupedSamples(experiments, channels=channels, grouping=grouping, seed=seed)
            model = ptychopinn(frame_size=frame_size, channels=channels, base_width=base_width)
            config = TrainConfig(epochs=epochs, finetune_epochs=finetune_epochs,
                                 batch_size=batch_size, lr=lr, loss=loss, device=device,
                                 seed=seed, **extra)
            result = run_training(model, data, config)
            provenance = {
                "training_data": {"kind": "experimental", "files": [str(p) for p in experiment],
                                  "experiments": len(experiments), "grouping": grouping,
                                  "patterns": int(sum(len(e.counts) for e in experiments))},
                "training": {"config": config.model_dump(), "history": result.history,
                             "resumed": resumed}}
        else:
            geometry = ExperimentGeometry(frame_size=frame_size)
            probes = {}
            for name in probe:
                if name in PROBE_MODELS:
                    probes[name] = make_probe(name, frame_size, geometry.object_pixel_size_m,
                                              geometry.energy_ev)
                else:
                    library_probe = np.asarray(ProbeLibrary().get(name)[0])
                    if library_probe.shape[-1] != frame_size:
                        # A probe measured with larger frames: the same field of view at the
                        # coarser pixel of frames cropped to N (what the model will see).
                        console.print(f"probe {name}: {library_probe.shape[-1]} px resampled "
                                      f"to {frame_size} px (Fourier crop)", highlight=False)
                        library_probe = resample_probe(library_probe, frame_size)
                    probes[name] = library_probe
            recipe = ProbeCentricRecipe(
                object_classes=tuple(classes), objects_per_class=objects_per_class,
                object_size=object_size, step_px=step_px, photons=tuple(photons),
                contrast=tuple(contrast), channels=channels, base_width=base_width,
                epochs=epochs, finetune_epochs=finetune_epochs, batch_size=batch_size, lr=lr,
                loss=loss, seed=seed, device=device, extra=extra)
            result, provenance = train_probe_centric(probes, recipe, geometry=geometry,
                                                     resumed=resumed)
    except PtychoError as exc:
        _fail(exc)
    save_model(result.model, output, provenance=provenance)
    console.print(f"saved {output} (best validation loss {result.best_val:.4f}, "
                  f"{result.patterns_per_s:.0f} patterns/s)")
    if register is not None:
        save_model(result.model, registry.root / register, provenance=provenance)
        console.print(f"registered as {register!r} in {registry.root}", highlight=False)


@app.command()
def evaluate(
    file: list[Path] = typer.Argument(..., help="Datasets with a ground truth or reference "
                                      "object (NPZ/CXI)."),
    model: list[str] = typer.Option(["default"], "--model", help="Models to compare (repeat)."),
    engine: str = typer.Option(None, help="Also an iterative engine (epie/rpie)."),
    epochs: int = typer.Option(50, help="Epochs for the iterative engine."),
    png: Path = typer.Option(None, help="Figure with FRC curves of every method."),
) -> None:
    """FRC-AUC table of models (and optionally an iterative engine) against ground truth."""
    from ._workflows import (
        _iterative_result,
        reconstruct_with_model,
        reference_on_grid,
        score_against,
    )
    from .io import read_dataset
    from .models import ModelRegistry

    table = Table(title="FRC-AUC (0-0.5 Nyquist) against the reference object")
    for column in ("file", "method", "phase", "amplitude", "NRMSE"):
        table.add_column(column)
    curves = {}
    try:
        registry = ModelRegistry()
        nets = {name: registry.load(name)[0] for name in model}
        for path in file:
            ds = read_dataset(path)
            if ds.object is None:
                raise PtychoError(f"{path}: no reference object to compare with")
            results = {}
            for name, net in nets.items():
                snap = reconstruct_with_model(ds, net)
                # A model of a smaller N sees cropped frames: score on its (coarser) grid.
                truth = reference_on_grid(ds.object, ds.frame_size, snap,
                                          net.config.frame_size)
                results[name] = score_against(snap.object, truth, snap.weight)
            if engine:
                # As `reconstruct` runs and scores it: inside the scan's covered box, as the
                # models above, not on the unilluminated border of the canvas.
                res = _iterative_result(ds, engine=engine, epochs=epochs,
                                        pie={"seed": 0, "probe_update": True, "device": None})
                results[engine] = score_against(res.object, res.truth, res.weight)
            for method, scores in results.items():
                table.add_row(path.name, method, f"{scores['frc_auc_0.5_phase']:.3f}",
                              f"{scores['frc_auc_0.5_amplitude']:.3f}",
                              f"{scores['nrmse']:.3f}")
                curves[f"{path.stem}: {method}"] = (scores["frc_phase"].freq,
                                                    scores["frc_phase"].frc)
    except PtychoError as exc:
        _fail(exc)
    except FloatingPointError as exc:  # --engine diverged
        _fail(_diverged(exc))
    except OSError as exc:
        _fail(_os_error(exc))
    Console().print(table)
    if png is not None:
        from .figures import frc_figure

        try:
            frc_figure(png, curves)
        except OSError as exc:
            _fail(_os_error(exc))
        console.print(f"wrote {png}")


@app.command()
def serve(
    data_dir: Path = typer.Option(None, help="Catalog directory (default "
                                  "$PTYCHOPINN_DATA or ~/.local/share/bluesky-ptychopinn/tiled)."),
    port: int = typer.Option(8000, help="Port on 127.0.0.1."),
    readable: list[Path] = typer.Option([], "--readable", "-r",
                                        help="Directories of detector files the server may read."),
) -> None:
    """Serve the embedded Tiled catalog of raw and derived runs until Ctrl-C."""
    import time

    from .catalog import EmbeddedTiled

    detector_dirs = list(readable)
    if data_dir is not None and (data_dir.parent / "detector").is_dir():
        detector_dirs.append(data_dir.parent / "detector")
    try:
        server = EmbeddedTiled(data_dir, readable=detector_dirs, port=port).start()
    except PtychoError as exc:
        _fail(exc)
    console.print(f"Tiled serving {server.data_dir} at {server.uri}\n"
                  f"API key: {server.data_dir / 'api_key'} (readable by you only)\n"
                  f"web UI: {server.base_url}?api_key=$(cat {server.data_dir / 'api_key'})")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


@app.command()
def replay(
    uid: str = typer.Argument(..., help="Raw run uid (or a unique prefix)."),
    model: str = typer.Option("default", help="Model name or directory."),
    tiled: str = typer.Option(None, "--tiled", envvar="TILED_URI",
                              help="Tiled URI (default: $TILED_URI, else the embedded catalog)."),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="API key of the --tiled server (default: $TILED_API_KEY)."),
    data_dir: Path = typer.Option(
        None, help="Embedded catalog directory when no --tiled (default: ./demo-output/tiled, "
                   "the catalog `make demo` writes, if it exists; else $PTYCHOPINN_DATA or "
                   "~/.local/share/bluesky-ptychopinn/tiled)."),
    refine: bool = typer.Option(True, help="Also refine iteratively (rPIE) beside the network; "
                                "the derived run gets 'refined' and 'final' streams."),
    refine_budget_s: float = typer.Option(5.0, "--refine-budget-s",
                                          help="Seconds of refinement after the last frame."),
    refine_positions: bool = typer.Option(False, "--refine-positions",
                                          help="The refinement also corrects each frame's "
                                          "position (encoder errors, stage jitter)."),
) -> None:
    """Re-stream an archived raw run through the live callback with a (newer) model."""
    from .catalog import replay_run

    server = None
    demo_catalog = Path("demo-output") / "tiled"
    if data_dir is None and demo_catalog.is_dir():
        data_dir = demo_catalog
    try:
        client, server = _tiled_client(tiled, api_key, data_dir)
        state = replay_run(client, uid, model=model, torch_threads=1,
                           refine="rpie" if refine else None, refine_budget_s=refine_budget_s,
                           refine_positions=refine_positions)
    except PtychoError as exc:
        _fail(exc)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps({"raw_uid": state.raw_uid, "derived_uid": state.derived_uid,
                      "frames": state.frames_done, "failed": state.failed, "best": state.best,
                      **{k: v for k, v in state.stats.items() if k != "device"}}, indent=2))


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("demo-output"), help="Where to write results."),
    sample: str = typer.Option("cells", help="siemens_star, test_chip, cells, quadrant_features."),
    strategy: str = typer.Option("feature", help="Feedback strategy: feature or uncertainty."),
    budget: int = typer.Option(500, help="Maximum frames."),
    model: str = typer.Option("default", help="Model name or directory."),
) -> None:
    """Simulated beamline scan with live reconstruction and feedback into an embedded Tiled."""
    import logging

    from .demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_demo(output_dir, sample=sample, strategy=strategy, budget=budget, model=model)
    except PtychoError as exc:
        _fail(exc)


@bus_app.command("serve")
def bus_serve(
    data_dir: Path = typer.Option(None, help="JetStream store (default $PTYCHOPINN_BUS_DATA or "
                                  "~/.local/share/bluesky-ptychopinn/nats)."),
    port: int = typer.Option(4222, help="Client port on 127.0.0.1."),
) -> None:
    """Serve a local nats-server (JetStream) on 127.0.0.1 until Ctrl-C."""
    import time

    from .distributed import NatsServer

    try:
        server = NatsServer(data_dir, port=port).start()
    except PtychoError as exc:
        _fail(exc)
    console.print(f"NATS JetStream serving at {server.url} (store {server.data_dir}, "
                  f"log {server.data_dir / 'nats-server.log'})")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


@app.command()
def worker(
    bus: str = typer.Option(..., "--bus", envvar="PTYCHOPINN_BUS",
                            help="NATS server(s): nats://HOST:PORT[,nats://...], or Kafka "
                            "brokers: kafka://HOST:PORT[,HOST:PORT...] (the kafka extra)."),
    tiled: str = typer.Option(..., "--tiled", envvar="TILED_URI",
                              help="Tiled URI of the raw runs and the derived runs."),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="Tiled API key (default $TILED_API_KEY)."),
    beamline: str = typer.Option("local", help="Beamline whose work queue to serve."),
    model: str = typer.Option("default", help="Model name or directory."),
    device: str = typer.Option(None, help="cuda, cuda:N or cpu (default: CUDA if present)."),
    path_map: list[str] = typer.Option([], "--path-map",
                                       help="ACQ_PREFIX=LOCAL_PREFIX: read detector files from "
                                       "a shared filesystem (repeat); default: through Tiled."),
    no_refine: bool = typer.Option(False, "--no-refine", help="Network only (no rPIE tier)."),
    refine_budget_s: float = typer.Option(5.0, "--refine-budget-s",
                                          help="Seconds of refinement after the last frame."),
    refine_positions: bool = typer.Option(False, "--refine-positions",
                                          help="The refinement also corrects each frame's "
                                          "position (encoder errors, stage jitter)."),
    batch_size: int = typer.Option(64, help="Frames per network call."),
    torch_threads: int = typer.Option(None, help="CPU threads of the reconstruction."),
    ack_wait_s: float = typer.Option(30.0, "--ack-wait-s",
                                     help="Seconds without a heartbeat before another worker "
                                     "takes a run (NATS: set by the first worker of a beamline; "
                                     "Kafka: the consumer's session timeout)."),
    report_every_s: float = typer.Option(5.0, "--report-every-s", help="Health log interval."),
    max_attempts: int = typer.Option(None, "--max-attempts", min=1,
                                     help="Attempts at one run, by any worker, before it is "
                                     "given up and its derived run ends 'fail' (default: "
                                     "NATS 10, set by the first worker of a beamline; Kafka "
                                     "5)."),
    max_runs: int = typer.Option(None, help="Exit after this many runs."),
    bus_creds: Path = typer.Option(None, "--bus-creds", exists=True, dir_okay=False,
                                   help="NATS credentials file (JWT + NKey seed)."),
    bus_tls_ca: Path = typer.Option(None, "--bus-tls-ca", exists=True, dir_okay=False,
                                    help="CA bundle to verify the bus's TLS certificate."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug log of this package."),
) -> None:
    """Reconstruct whole runs from the bus's work queue into derived runs in Tiled."""
    import logging
    import ssl

    from .distributed import WorkerOptions, run_worker

    connect_options: dict = {}
    if bus_creds is not None:
        connect_options["user_credentials"] = str(bus_creds)
    if bus_tls_ca is not None:
        connect_options["tls"] = ssl.create_default_context(cafile=str(bus_tls_ca))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if verbose:
        logging.getLogger("bluesky_ptychopinn").setLevel(logging.DEBUG)
    options = WorkerOptions(bus=bus, tiled=tiled, api_key=api_key, beamline=beamline,
                            model=model, device=device, refine=not no_refine,
                            refine_budget_s=refine_budget_s, refine_positions=refine_positions,
                            path_map=list(path_map),
                            ack_wait_s=ack_wait_s, report_every_s=report_every_s,
                            batch_size=batch_size, torch_threads=torch_threads,
                            max_attempts=max_attempts, connect_options=connect_options)
    try:
        from ._workflows import check_device

        check_device(device)  # before connecting: torch would fail at the first run
        run_worker(options, max_runs=max_runs)
    except (PtychoError, ValueError) as exc:
        _fail(exc)


from ._cli_watch import watch  # noqa: E402

app.command()(watch)

from ._cli_calibrate import calibrate  # noqa: E402

app.command()(calibrate)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


_SPOOL_DIR_HELP = ("Spool directory (default $PTYCHOPINN_SPOOL or "
                   "~/.local/share/bluesky-ptychopinn/spool).")


@spool_app.command("status")
def spool_status_cmd(
    spool_dir: Path = typer.Option(None, help=_SPOOL_DIR_HELP),
) -> None:
    """List the runs whose documents wait in the spool for Tiled."""
    from .catalog import default_spool_dir, spool_status

    runs = spool_status(spool_dir)
    table = Table("label", "run", "documents", "MB", "stop", "state")
    for run in runs:
        table.add_row(run["label"], run["uid"], str(run["documents"]),
                      f"{run['bytes'] / 1e6:.1f}", "yes" if run["stopped"] else "no",
                      "being delivered (writer running)" if run["in_use"] else "waiting")
    if runs:
        Console().print(table)
    console.print(f"{len(runs)} run(s) spooled in {spool_dir or default_spool_dir()}")


@spool_app.command("flush")
def spool_flush_cmd(
    spool_dir: Path = typer.Option(None, help=_SPOOL_DIR_HELP),
    tiled: str = typer.Option(None, "--tiled", envvar="TILED_URI",
                              help="Tiled URI (default: $TILED_URI, else the embedded catalog)."),
    api_key: str = typer.Option(None, "--api-key", envvar="TILED_API_KEY",
                                help="Tiled API key (default $TILED_API_KEY)."),
    data_dir: Path = typer.Option(None, help="Embedded catalog directory when no --tiled."),
    label: str = typer.Option(None, help="Only this writer's runs (raw, derived)."),
    batch_size: int = typer.Option(50, help="TiledWriter batch size for the replayed runs."),
) -> None:
    """Deliver the spooled runs no running writer holds to Tiled (each verified, once)."""
    from bluesky_tiled_plugins import TiledWriter

    from .catalog import flush_spool

    server = None
    try:
        client, server = _tiled_client(tiled, api_key, data_dir)
        report = flush_spool(TiledWriter(client, batch_size=batch_size), spool_dir, label=label)
    except PtychoError as exc:
        _fail(exc)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(report, indent=2))
    if report["failed"]:
        raise typer.Exit(code=1)
