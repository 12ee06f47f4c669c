"""`bluesky-ptychopinn watch`: a real Tiled server over HTTP on 127.0.0.1, a real RunEngine
scan reconstructed live, and the watcher (websocket streaming, headless Agg) in its own
thread: what it draws is what Tiled stores."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import typer  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky_tiled_plugins import TiledWriter  # noqa: E402
from event_model import compose_run  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from bluesky_ptychopinn._cli_watch import PngFrames, RunViewer, watch  # noqa: E402
from bluesky_ptychopinn.callbacks import LiveReconstruction  # noqa: E402
from bluesky_ptychopinn.catalog import EmbeddedTiled, watch_derived_runs  # noqa: E402
from bluesky_ptychopinn.devices import sim_beamline  # noqa: E402
from bluesky_ptychopinn.geometry import positions_m_to_px  # noqa: E402
from bluesky_ptychopinn.plans import ptycho_scan  # noqa: E402

# tiled 0.2.20's own websocket client, under websockets 17
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


def _watch_in_thread(client, on_document, **kwargs):
    ready, box = threading.Event(), {}

    def target():
        try:
            box["result"] = watch_derived_runs(client, on_document, ready=ready, **kwargs)
        except BaseException as exc:  # re-raised by the test
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, name="watch", daemon=True)
    thread.start()
    assert ready.wait(30), "the watcher did not subscribe"
    return thread, box


def test_watch_shows_the_live_run_as_tiled_stores_it(tiled, tmp_path):
    client = tiled.client()
    viewer = RunViewer(PngFrames(tmp_path / "png", max_frames=3))
    thread, box = _watch_in_thread(tiled.client(), viewer, once=True, timeout=120,
                                   on_idle=viewer.idle)
    assert "error" not in box and box.get("result") is None
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=4)
    live = LiveReconstruction(isolation="thread", torch_threads=1, refine_budget_s=1.0,
                              publish_interval_s=0.05)
    live.subscribe(TiledWriter(client, batch_size=1))  # each snapshot reaches Tiled at once
    RE = RunEngine()
    RE.subscribe(TiledWriter(client, batch_size=5))
    RE.subscribe(live)
    dx = bl.pixel_size_m
    try:
        (uid,) = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                                pattern="raster", extent_m=(7 * 5 * dx,) * 2, step_m=5 * dx))
        state = live.wait(uid, timeout=120)
    finally:
        live.close()
    thread.join(timeout=60)
    assert not thread.is_alive() and "error" not in box
    result = box["result"]
    assert result.mode == "websocket" and not result.timed_out
    assert result.finished == [state.derived_uid]

    derived = client[state.derived_uid]
    plot = viewer.plots[state.derived_uid]
    np.testing.assert_allclose(plot.images["network"].get_array(),
                               derived["snapshots"]["object_phase"].read()[-1], atol=1e-6)
    np.testing.assert_allclose(plot.images["uncertainty"].get_array(),
                               derived["snapshots"]["uncertainty"].read()[-1], atol=1e-6)
    np.testing.assert_allclose(plot.images["refined"].get_array(),
                               derived["final"]["object_phase"].read()[-1], atol=1e-6)
    assert plot.images["network"].get_clim() == plot.images["refined"].get_clim()
    fps = derived["metrics"]["frames_per_s"].read()
    assert plot.frames_per_s == pytest.approx(float(np.asarray(fps)[-1]))
    assert plot._scale > 0

    # The scan path: every raw position, on the image canvas (what the reconstruction used).
    raw = client[uid]
    keys = raw.start["ptycho"]["positioner_keys"]
    stage = np.stack([np.asarray(raw["primary"][keys[a]].read(), float) for a in "yx"], axis=1)
    canvas = derived["snapshots"].metadata["configuration"]["canvas"]["data"]
    expected = (positions_m_to_px(stage, canvas["pixel_size_m"], origin_m=(0.0, 0.0))
                - np.asarray(canvas["canvas_origin_px"]))
    np.testing.assert_allclose(plot.scan_path_px, expected)
    h, w = plot.images["network"].get_array().shape
    assert (expected >= 0).all() and (expected[:, 0] < h).all() and (expected[:, 1] < w).all()

    folder = tmp_path / "png" / state.derived_uid
    assert (folder / "latest.png").stat().st_size > 10_000
    frames = sorted(folder.glob("frame-*.png"))
    assert 1 <= len(frames) <= 3  # bounded


def _synthetic_derived_run(client, n: int = 3, shape=(24, 20), *, before_stop=None
                           ) -> tuple[str, list]:
    """A derived run written by TiledWriter without a reconstruction (no raw run);
    ``before_stop()`` is called after the first event."""
    bundle = compose_run(metadata={"plan_name": "ptychopinn_reconstruction",
                                   "original_run_uid": "not-stored", "model": {"name": "m"}})
    writer = TiledWriter(client, batch_size=1)
    writer("start", bundle.start_doc)
    keys = {k: {"source": "t", "dtype": "array", "shape": list(shape), "dtype_numpy": "<f4"}
            for k in ("object_phase", "uncertainty")}
    stream = bundle.compose_descriptor(name="snapshots", data_keys=keys, configuration={
        "canvas": {"data": {"pixel_size_m": 1e-8, "canvas_origin_px": [0.0, 0.0]},
                   "timestamps": {}, "data_keys": {}}})
    writer("descriptor", stream.descriptor_doc)
    rng = np.random.default_rng(0)
    phases = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    for k, phase in enumerate(phases):
        writer("event", stream.compose_event(
            data={"object_phase": phase, "uncertainty": np.abs(phase)},
            timestamps={"object_phase": 0.0, "uncertainty": 0.0}))
        if k == 0 and before_stop is not None:
            before_stop()
    writer("stop", bundle.compose_stop())
    return bundle.start_doc["uid"], phases


def test_a_server_without_streaming_is_polled_and_says_so(tmp_path, caplog):
    with EmbeddedTiled(tmp_path / "catalog", streaming=False) as server:
        seen = []
        with caplog.at_level(logging.WARNING, logger="bluesky_ptychopinn.catalog._watch"):
            thread, box = _watch_in_thread(server.client(), lambda n, d: seen.append((n, d)),
                                           once=True, timeout=30, poll_interval_s=0.2)
        uid, phases = _synthetic_derived_run(server.client())
        thread.join(timeout=40)
    assert box["result"].mode == "polling" and box["result"].finished == [uid]
    (line,) = [r.getMessage() for r in caplog.records if "polling" in r.getMessage()]
    assert "cannot stream" in line and "HTTP 5" in line
    names = [n for n, _ in seen]
    assert names[0] == "start" and names[-1] == "stop" and "descriptor" in names
    shown = [d["data"]["object_phase"] for n, d in seen
             if n == "event" and "object_phase" in d["data"]]
    np.testing.assert_array_equal(shown[-1], phases[-1])


def test_websocket_delivers_every_array_of_a_run(tiled):
    """Without a reconstruction: each key's latest row arrives, then the stop."""
    seen = []
    thread, box = _watch_in_thread(tiled.client(), lambda n, d: seen.append((n, d)),
                                   once=True, timeout=30, mode="websocket")
    uid, phases = _synthetic_derived_run(tiled.client())
    thread.join(timeout=40)
    assert box["result"].finished == [uid]
    last = {}
    for name, doc in seen:
        if name == "event":
            last.update(doc["data"])
    np.testing.assert_array_equal(last["object_phase"], phases[-1])
    np.testing.assert_array_equal(last["uncertainty"], np.abs(phases[-1]))
    assert seen[-1][0] == "stop" and seen[-1][1]["exit_status"] == "success"


@pytest.mark.parametrize("mode", ["websocket", "polling"])
def test_a_run_under_way_when_the_watch_begins_is_followed(tiled, mode):
    seen, started = [], {}

    def begin_watching():  # the run exists and has one snapshot already
        started["thread"], started["box"] = _watch_in_thread(
            tiled.client(), lambda n, d: seen.append((n, d)), once=True, timeout=30, mode=mode,
            poll_interval_s=0.2)

    uid, phases = _synthetic_derived_run(tiled.client(), n=4, before_stop=begin_watching)
    started["thread"].join(timeout=40)
    assert started["box"]["result"].finished == [uid]
    shown = [d["data"]["object_phase"] for n, d in seen
             if n == "event" and "object_phase" in d["data"]]
    np.testing.assert_array_equal(shown[-1], phases[-1])
    assert [n for n, _ in seen].count("start") == 1 and seen[-1][0] == "stop"


def test_an_external_tiled_server_streams_to_the_watcher(tmp_path):
    """tiled's own `tiled serve catalog --cache memory` in another process: the URI is all
    the watcher knows."""
    import shutil
    import subprocess
    import sys
    import time

    import httpx
    from tiled.client import from_uri

    sys.path.insert(0, str(Path(__file__).parent))
    from _tiled_process import free_port

    port = free_port()
    tiled_cli = shutil.which("tiled", path=str(Path(sys.executable).parent))
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (the child's)
    proc = subprocess.Popen([tiled_cli, "serve", "catalog", "--temp", "--api-key", "secret",
                             "--port", str(port), "--cache", "memory"], stdout=log, stderr=log)
    log.close()
    uri = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "no tiled server"
            time.sleep(0.2)
        seen = []
        thread, box = _watch_in_thread(from_uri(uri, api_key="secret"),
                                       lambda n, d: seen.append((n, d)), once=True,
                                       timeout=30, mode="websocket")
        uid, phases = _synthetic_derived_run(from_uri(uri, api_key="secret"))
        thread.join(timeout=40)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert box["result"].finished == [uid] and box["result"].mode == "websocket"
    shown = [d["data"]["object_phase"] for n, d in seen
             if n == "event" and "object_phase" in d["data"]]
    np.testing.assert_array_equal(shown[-1], phases[-1])


def test_the_command_writes_the_pngs_of_a_new_run(tiled, tmp_path):
    """`bluesky-ptychopinn watch --png DIR --once` in its own process, as a user runs it."""
    import subprocess
    import sys
    import time

    command = [sys.executable, "-c", "from bluesky_ptychopinn._cli_watch import watch; "
               "import typer; typer.run(watch)", "--tiled", tiled.uri, "--api-key",
               tiled.api_key, "--png", str(tmp_path), "--once", "--timeout", "50",
               "--new-only"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while "watching" not in (line := proc.stdout.readline()):  # subscribed
            assert line and time.monotonic() < deadline, "watch did not start"
        uid, _ = _synthetic_derived_run(tiled.client())
        output = line + proc.communicate(timeout=40)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "(websocket)" in output
    assert (tmp_path / uid / "latest.png").stat().st_size > 5_000
    assert list((tmp_path / uid).glob("frame-0001.png"))


def test_an_unreachable_server_is_one_clear_line_and_a_non_zero_exit():
    app = typer.Typer()
    app.command()(watch)
    result = CliRunner().invoke(app, ["--tiled", "http://127.0.0.1:9/api/v1", "--png", "x",
                                      "--once", "--timeout", "5"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Tiled at "), lines


def test_a_finished_run_keeps_no_scan_path_in_a_long_running_watcher(tiled):
    """A watcher follows runs for days: once a run's stop is delivered, only its uid stays
    (to be known as seen), not one stage reading per frame."""
    from bluesky_ptychopinn.catalog._watch import DerivedRunWatcher, _Run

    watcher = DerivedRunWatcher(tiled.client(), mode="polling")
    run = watcher._runs["r1"] = _Run("r1", {"uid": "r1"})
    run.positions.update({k: (1e-6 * k, 0.0) for k in range(10_000)})
    run.last_row[("snapshots", "object_phase")] = 12
    watcher._finish(run)
    assert run.done and not run.positions and not run.last_row
    assert "r1" in watcher._runs  # still known: never delivered twice
    name, stop = watcher._out.get_nowait()
    assert name == "stop" and stop["run_start"] == "r1"
