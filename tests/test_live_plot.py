"""LiveReconstructionPlot, headless (Agg): the images shown are the derived run's snapshots
as stored in a real Tiled server over HTTP, network and refined on one colour range, with a
scale bar in micrometres."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky_tiled_plugins import TiledWriter  # noqa: E402

from bluesky_ptychopinn.callbacks import LiveReconstruction, LiveReconstructionPlot  # noqa: E402
from bluesky_ptychopinn.callbacks._plot import scale_bar_length_um  # noqa: E402
from bluesky_ptychopinn.devices import sim_beamline  # noqa: E402
from bluesky_ptychopinn.plans import ptycho_scan  # noqa: E402


def test_scale_bar_lengths_are_round():
    assert scale_bar_length_um(200, 50e-9) == 2.0  # 10 um wide -> 2 um
    assert scale_bar_length_um(100, 1e-6) == 20.0
    assert scale_bar_length_um(64, 7e-9) == 0.05


def test_the_plot_shows_what_tiled_stores(tiled, tmp_path):
    client = tiled.client()
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=4)
    live = LiveReconstruction(isolation="thread", torch_threads=1, refine_budget_s=1.0,
                              publish_interval_s=0.05)
    plot = LiveReconstructionPlot()
    live.subscribe(TiledWriter(client))
    live.subscribe(plot)
    RE = RunEngine()
    RE.subscribe(TiledWriter(client))
    RE.subscribe(live)
    dx = bl.pixel_size_m
    try:
        (uid,) = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                                pattern="raster", extent_m=(7 * 5 * dx,) * 2, step_m=5 * dx))
        state = live.wait(uid, timeout=120)
    finally:
        live.close()
    derived = client[state.derived_uid]
    network = derived["snapshots"]["object_phase"].read()[-1]
    refined = derived["final"]["object_phase"].read()[-1]
    np.testing.assert_array_equal(plot.images["network"].get_array(), network)
    np.testing.assert_array_equal(plot.images["refined"].get_array(), refined)
    assert plot.images["network"].get_clim() == plot.images["refined"].get_clim()
    assert plot._scale > 0 and np.isfinite(plot.frames_per_s)
    plot._fig.savefig(tmp_path / "live.png")
    assert (tmp_path / "live.png").stat().st_size > 10_000



def test_the_browsing_snippet_of_the_beamline_docs_runs(tiled):
    """docs/beamline.md "Browsing and replaying", run as written against the runs above."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "beamline.md").read_text()
    section = text[text.index("## Browsing and replaying"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"tiled": tiled.client()}
    exec(code, namespace)
    assert namespace["raw"].start["plan_name"] == "ptycho_scan"
    assert namespace["run"].start["original_run_uid"] == namespace["raw"].start["uid"]
    assert namespace["phase"].ndim == 2 and namespace["probe"].ndim == 3


def test_partial_events_and_a_late_refined_row():
    """Documents as the Tiled watcher delivers them: one array per event, streams unordered;
    a "refined" row arriving after the "final" one does not replace it."""
    plot = LiveReconstructionPlot()
    plot("start", {"uid": "d", "plan_name": "ptychopinn_reconstruction",
                   "original_run_uid": "r", "model": {"name": "m"}})
    canvas = {"canvas": {"data": {"pixel_size_m": 1e-8, "canvas_origin_px": [0, 0]}}}
    for name in ("snapshots", "refined", "final"):
        plot("descriptor", {"uid": name, "name": name, "configuration": canvas})
    rng = np.random.default_rng(1)
    network, final, late = (rng.standard_normal((16, 12)) for _ in range(3))
    plot("event", {"descriptor": "snapshots", "data": {"object_phase": network}})
    assert "uncertainty" not in plot.images
    plot("event", {"descriptor": "final", "data": {"object_phase": final}})
    plot("event", {"descriptor": "refined", "data": {"object_phase": late}})
    np.testing.assert_array_equal(plot.images["network"].get_array(), network)
    np.testing.assert_array_equal(plot.images["refined"].get_array(), final)
    path = np.array([[2.0, 3.0], [2.0, 8.0], [9.0, 8.0]])
    plot("scan_path", {"run_start": "d", "positions_px": path})
    np.testing.assert_array_equal(plot.path_line.get_xydata(), path[:, ::-1])
