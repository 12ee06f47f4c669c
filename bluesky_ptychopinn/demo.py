"""The demo: a simulated beamline scan with live reconstruction into an embedded Tiled.

    bluesky-ptychopinn demo            (what ``make demo`` runs)

1. starts a local Tiled server (SQLite + zarr + DuckDB) on 127.0.0.1;
2. builds the simulated beamline (sample stage, HDF5-writing detector, hidden sample);
3. runs ``RE(ptycho_scan_with_feedback(...))`` with the shipped default model reconstructing
   live on the CPU: raw and derived runs go to Tiled through TiledWriter;
4. reads both runs back from Tiled, scores the reconstruction against the hidden truth
   (FRC-AUC), saves a PNG and prints how to browse the results.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


def run_demo(
    output_dir: str | Path = "demo-output",
    *,
    sample: str = "cells",
    strategy: str = "feature",
    budget: int = 500,
    model: str = "default",
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Run the beamline demo; returns the summary it prints (also saved as JSON)."""
    import torch
    from bluesky import RunEngine
    from bluesky_tiled_plugins import TiledWriter
    from tiled.queries import Key

    from .callbacks import LiveReconstruction
    from .catalog import EmbeddedTiled
    from .devices import sim_beamline
    from .figures import demo_figure
    from .metrics import compare_objects, covered_box
    from .plans import ptycho_scan_with_feedback

    console = console or Console()
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    detector_dir = out / "detector"
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    with console.status("starting the embedded Tiled server"):
        tiled = EmbeddedTiled(out / "tiled", readable=[detector_dir]).start()
    try:
        client = tiled.client()
        bl = sim_beamline(sample, write_path=detector_dir, seed=seed, photon_flux=2e8,
                          exposure_s=0.005)
        RE = RunEngine(call_returns_result=True)
        RE.subscribe(TiledWriter(client, batch_size=50))
        live = LiveReconstruction(model, batch_size=64, snapshot_every=128, torch_threads=1)
        live.subscribe(TiledWriter(client, batch_size=1))  # written as it goes: watchable
        RE.subscribe(live)
        dx = bl.pixel_size_m
        fov = bl.field_of_view_m
        region = (0.9 * fov[0], 0.9 * fov[1])
        console.print(f"[bold]sample[/] {sample} ({bl.sample.shape[0]}x{bl.sample.shape[1]} px, "
                      f"{dx * 1e9:.1f} nm pixels); scanning {region[0] * 1e6:.2f} x "
                      f"{region[1] * 1e6:.2f} um, budget {budget} frames, strategy {strategy}")
        t_scan = time.perf_counter()
        t_scan_wall = time.time()
        with console.status("scanning with live reconstruction and feedback"):
            result = RE(ptycho_scan_with_feedback(
                bl.detector, bl.stage, live, geometry=bl.ptycho_metadata(),
                region_extent_m=region, coarse_step_m=16 * dx, fine_step_m=5 * dx,
                strategy=strategy, budget=budget, points_per_decision=64,
                md={"sample": sample, "purpose": "bluesky-ptychopinn demo"}))
            scan_seconds = time.perf_counter() - t_scan
            state = live.wait(timeout=120)
        live.close()  # the reconstruction process is done with this session
        raw_uid = result.run_start_uids[0]
        summary_plan = result.plan_result
        # Read everything back from Tiled: the demo shows the stored results, not memory.
        raw = client[raw_uid]
        derived_uid = list(client.search(Key("start.original_run_uid") == raw_uid))[0]
        derived = client[derived_uid]
        primary = raw["primary"].read()
        ys = np.asarray(primary[bl.stage.y.name])
        xs = np.asarray(primary[bl.stage.x.name])
        iterations = np.asarray(primary["feedback_iteration"])
        amp = derived["snapshots"]["object_amplitude"][-1]
        phase = derived["snapshots"]["object_phase"][-1]
        unc = derived["snapshots"]["uncertainty"][-1]
        weight = derived["snapshots"]["weight"][-1]
        recon = amp * np.exp(1j * phase)
        oy, ox = state.canvas_origin_px
        truth_origin = bl.detector.sample_origin_px
        # Truth on the same canvas: canvas pixel (i, j) is object pixel (i + oy, j + ox) in
        # stage-pixel coordinates, i.e. truth pixel (i + oy + cy, j + ox + cx).
        rows = np.arange(recon.shape[0]) + oy + truth_origin[0]
        cols = np.arange(recon.shape[1]) + ox + truth_origin[1]
        ri, ci = np.round(rows).astype(int), np.round(cols).astype(int)
        inside = (ri >= 0) & (ri < bl.sample.shape[0])
        inside_c = (ci >= 0) & (ci < bl.sample.shape[1])
        truth = np.ones_like(recon)
        truth[np.ix_(inside, inside_c)] = bl.sample[np.ix_(ri[inside], ci[inside_c])]
        box = covered_box(weight)

        def phase_auc(image: np.ndarray) -> float:
            return float(compare_objects(image[box], truth[box], taper_px=8)
                         ["frc_auc_0.5_phase"])

        scores = compare_objects(recon[box], truth[box], taper_px=8)
        refined = probe = None
        quality = {"network": _quality_vs_time(derived, "snapshots", phase_auc, t_scan_wall)}
        if "final" in derived:
            final = derived["final"]
            refined = final["object_amplitude"][-1] * np.exp(1j * final["object_phase"][-1])
            probe = final["probe_amplitude"][-1] * np.exp(1j * final["probe_phase"][-1])
            quality["refined (rPIE)"] = _quality_vs_time(derived, "refined", phase_auc,
                                                         t_scan_wall)
        stats = derived.stop.get("ptychopinn", {})
        refinement = stats.get("refinement", {})
        frames = int(len(ys))
        summary = {
            "raw_uid": raw_uid,
            "derived_uid": derived_uid,
            "frames": frames,
            "scan_seconds": round(scan_seconds, 2),
            "reconstruction_frames_per_s": round(float(stats.get("frames_per_s", 0.0)), 1),
            "batch_latency_p50_s": round(float(stats.get("batch_latency_p50_s", 0.0)), 4),
            "batch_latency_p99_s": round(float(stats.get("batch_latency_p99_s", 0.0)), 4),
            "frc_auc_0.5_phase": round(float(scores["frc_auc_0.5_phase"]), 3),
            "frc_auc_0.5_amplitude": round(float(scores["frc_auc_0.5_amplitude"]), 3),
            "refined_frc_auc_0.5_phase": (round(phase_auc(refined), 3) if refined is not None
                                          else None),
            "refinement": {k: refinement.get(k) for k in
                           ("epochs", "start", "best", "seconds_after_stop", "residual",
                            "network_residual")},
            "feedback": {k: v for k, v in summary_plan.items() if k != "uid"},
            "frames_per_iteration": {int(k): int((iterations == k).sum())
                                     for k in np.unique(iterations)},
            "derived_exit_status": derived.stop["exit_status"],
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        title = (f"{sample}: {frames} frames; phase FRC-AUC(0-0.5) network "
                 f"{summary['frc_auc_0.5_phase']:.2f}")
        if refined is not None:
            title += f", refined {summary['refined_frc_auc_0.5_phase']:.2f}"
        png = demo_figure(
            out / "demo.png", recon=recon, truth=truth, uncertainty=unc,
            scan_px=_stage_to_canvas(ys, xs, dx, state.canvas_origin_px), iterations=iterations,
            refined=refined, probe=probe, quality=quality, last_frame_s=scan_seconds,
            title=title,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(console, summary, png, tiled, out)
        return summary
    finally:
        tiled.stop()


def _quality_vs_time(derived, stream: str, score, t0: float) -> tuple[list, list]:
    """(seconds since ``t0``, score) of every event of a derived-run image stream."""
    node = derived[stream]
    times = np.asarray(node["time"].read(), dtype=float)
    amplitude, phase = node["object_amplitude"].read(), node["object_phase"].read()
    scores = [score(amplitude[i] * np.exp(1j * phase[i])) for i in range(len(times))]
    return (times - t0).tolist(), scores


def _stage_to_canvas(ys, xs, dx, origin_px) -> np.ndarray:
    return np.stack([ys / dx - origin_px[0], xs / dx - origin_px[1]], axis=1)


def _print_summary(console: Console, summary: dict, png: Path, tiled, out: Path) -> None:
    table = Table(title="bluesky-ptychopinn demo", show_header=False)
    rows = [
        ("frames acquired", summary["frames"]),
        ("scan time", f"{summary['scan_seconds']} s"),
        ("reconstruction", f"{summary['reconstruction_frames_per_s']} frames/s (CPU, 1 thread)"),
        ("batch latency p50 / p99",
         f"{summary['batch_latency_p50_s'] * 1e3:.0f} / "
         f"{summary['batch_latency_p99_s'] * 1e3:.0f} ms"),
        ("network FRC-AUC (0-0.5 Nyquist) vs hidden truth",
         f"phase {summary['frc_auc_0.5_phase']}, amplitude {summary['frc_auc_0.5_amplitude']}"),
        ("refined (rPIE) FRC-AUC, phase",
         f"{summary['refined_frc_auc_0.5_phase']} after "
         f"{(summary['refinement'].get('epochs') or 0):.1f} epochs, start "
         f"{summary['refinement'].get('start')}, "
         f"{(summary['refinement'].get('seconds_after_stop') or 0):.1f} s after the last frame"),
        ("shown (lower Fourier residual)", summary["refinement"].get("best") or "network"),
        ("feedback", f"{summary['feedback']['decisions']} decisions, stop: "
                     f"{summary['feedback']['stop_reason']}"),
        ("frames per iteration (0 = overview)", summary["frames_per_iteration"]),
        ("raw run", summary["raw_uid"]),
        ("derived run", f"{summary['derived_uid']} ({summary['derived_exit_status']})"),
        ("figure", str(png)),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    console.print(table)
    console.print(
        "\n[bold]Browse the results[/]: start the server again with\n"
        f"  bluesky-ptychopinn serve --data-dir {out / 'tiled'}\n"
        "then, in Python:\n"
        "  from tiled.client import from_uri\n"
        "  c = from_uri('http://127.0.0.1:8000/api/v1',\n"
        f"               api_key=open('{out / 'tiled' / 'api_key'}').read().strip())\n"
        f"  c['{summary['derived_uid']}']['snapshots']['object_phase'][-1]\n",
        soft_wrap=True,  # never break the code lines: they are meant to be copied
    )
