"""Remote workers over NATS JetStream, end to end: a real nats-server (JetStream, temporary
store) and a real Tiled server on 127.0.0.1, a real RunEngine with the simulated beamline
publishing, and worker subprocesses (``bluesky-ptychopinn worker``) that are started, killed
and started late. Network only (no refinement), short ack deadline, small scans."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from tiled.queries import Key
from typer.testing import CliRunner

from bluesky_ptychopinn.cli import app
from bluesky_ptychopinn.devices import sim_beamline
from bluesky_ptychopinn.distributed import (
    NatsServer,
    PathMap,
    docs_stream,
    free_port,
    publish_documents,
    run_filter,
)
from bluesky_ptychopinn.distributed._codec import decode
from bluesky_ptychopinn.distributed._server import die_with_parent
from bluesky_ptychopinn.plans import ptycho_scan

ACK_WAIT_S = 3.0
BEAMLINE = "tst"


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


class WorkerProcess:
    """``bluesky-ptychopinn worker`` in a subprocess, its log in a file."""

    def __init__(self, log: Path, bus: str, tiled, beamline: str, *extra: str) -> None:
        self.log = log
        cmd = [sys.executable, "-c", "from bluesky_ptychopinn.cli import app; app()", "worker",
               "--bus", bus, "--tiled", tiled.uri, "--api-key", tiled.api_key,
               "--beamline", beamline, "--device", "cpu", "--no-refine", "--batch-size", "16",
               "--torch-threads", "1", "--ack-wait-s", str(ACK_WAIT_S),
               "--report-every-s", "1", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)

    def text(self) -> str:
        return self.log.read_text()

    def runs(self, what: str) -> list[str]:
        """Raw uids of the ``took`` / ``finished`` lines."""
        return re.findall(rf"{what} run ([0-9a-f-]{{36}})", self.text())

    def wait_for(self, pattern: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in {timeout} s:\n{self.text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, bus, tiled):
    """Two workers serving BEAMLINE, started together (the tests below use them in turn)."""
    logs = tmp_path_factory.mktemp("workers")
    workers = [WorkerProcess(logs / f"w{k}.log", bus.url, tiled, BEAMLINE) for k in range(2)]
    try:
        for w in workers:
            w.wait_for("ready on", timeout=120)
        yield workers
    finally:
        for w in workers:
            w.stop()


def _engine(tiled, bus_url: str, beamline: str):
    RE = RunEngine(call_returns_result=True)
    # Small batches: the workers read the frames through Tiled while the scan runs.
    RE.subscribe(TiledWriter(tiled.client(), batch_size=4))
    handle = publish_documents(RE, bus_url, beamline=beamline)
    return RE, handle


def _scan(RE, bl, n_side: int = 6):
    dx = bl.pixel_size_m
    result = RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(),
                            pattern="raster", extent_m=(5 * dx * (n_side - 1),) * 2,
                            step_m=5 * dx))
    assert result.exit_status == "success"
    return result.run_start_uids[0]


def _wait_finished(workers, uids, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not set(uids) <= {u for w in workers for u in w.runs("finished")}:
        if time.monotonic() > deadline:
            logs = "\n".join(w.text()[-3000:] for w in workers)
            raise AssertionError(f"runs {uids} not all finished in {timeout} s:\n{logs}")
        time.sleep(0.2)


def _derived(client, raw_uid: str) -> list[str]:
    return list(client.search(Key("start.original_run_uid") == raw_uid))


def _assert_one_whole_derived_run(client, raw_uid: str, frames: int) -> None:
    derived = _derived(client, raw_uid)
    assert len(derived) == 1, derived
    run = client[derived[0]]
    assert run.start["plan_name"] == "ptychopinn_reconstruction"
    assert run.stop["exit_status"] == "success", run.stop
    assert run["metrics"]["frames_done"].read()[-1] == frames
    assert run["snapshots"]["frames"].read()[-1] == frames


def test_two_workers_share_three_runs_each_reconstructed_once_whole(pool, bus, tiled):
    RE, handle = _engine(tiled, bus.url, BEAMLINE)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=11)
    uids = [_scan(RE, bl) for _ in range(3)]
    assert handle.flush(30) and handle.stats.dropped == 0
    _wait_finished(pool, uids)
    handle.close()
    client = tiled.client()
    took = [u for w in pool for u in w.runs("took")]
    assert sorted(took) == sorted(uids)  # each run handed out once: no redelivery
    per_worker = [set(w.runs("finished")) & set(uids) for w in pool]
    assert all(per_worker), per_worker  # both workers got work
    for uid in uids:
        _assert_one_whole_derived_run(client, uid, 36)


def _kill_the_taker(workers, client) -> tuple[threading.Thread, dict]:
    """A thread that SIGKILLs whichever of ``workers`` takes a new run, once that run's partial
    derived run is in Tiled; ``killed`` then says which worker, which run, when, and the
    derived run's stop document at that moment."""
    before = [set(w.runs("took")) for w in workers]
    killed: dict = {}

    def kill_when_mid_run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for k, w in enumerate(workers):
                new = set(w.runs("took")) - before[k]
                if new:
                    uid = new.pop()
                    # Its partial derived run is in Tiled (start and first snapshots).
                    derived = _derived(client, uid)
                    if derived:
                        w.proc.send_signal(signal.SIGKILL)
                        w.proc.wait()
                        # Read now: ACK_WAIT_S later the other worker replaces it (same uid).
                        stop = client[derived[0]].metadata.get("stop")
                        killed.update(index=k, uid=uid, t=time.monotonic(), stop=stop)
                        return
            time.sleep(0.05)

    return threading.Thread(target=kill_when_mid_run), killed


def _scan_killing_the_taker(tiled, bus, beamline: str, workers, seed: int):
    """One scan on ``beamline``, the worker that takes it SIGKILLed mid-run; returns its uid,
    ``killed`` and the other worker, once that one has finished the run (redone or closed)."""
    RE, handle = _engine(tiled, bus.url, beamline)
    # 0.15 s exposures: the scan lasts ~6 s, the worker that takes it is killed mid-run.
    bl = sim_beamline("test_chip", write_path=tiled.detector_dir, seed=seed, exposure_s=0.15)
    killer, killed = _kill_the_taker(workers, tiled.client())
    killer.start()
    uid = _scan(RE, bl)
    t_stop = time.monotonic()
    killer.join()
    assert killed.get("uid") == uid, "the worker was not killed during the scan"
    assert killed["t"] < t_stop  # mid-run: before the raw run's stop document
    assert killed["stop"] is None  # the killed worker left a partial run, never "success"
    other = workers[1 - killed["index"]]
    _wait_finished([other], [uid], timeout=60 + ACK_WAIT_S)
    handle.close()
    return uid, killed, other


def test_a_killed_workers_run_is_redone_by_the_other_one_derived_run(pool, bus, tiled):
    uid, killed, other = _scan_killing_the_taker(tiled, bus, BEAMLINE, pool, seed=12)
    assert uid not in pool[killed["index"]].runs("finished")
    assert re.search(rf"finished run {uid} .*replaced a partial one", other.text())
    _assert_one_whole_derived_run(tiled.client(), uid, 36)


async def _announcements_left(url: str, beamline: str) -> int:
    import nats

    from bluesky_ptychopinn.distributed import runs_stream

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(runs_stream(beamline))).state.messages
    finally:
        await nc.close()


def test_a_run_given_up_after_its_last_delivery_ends_fail_not_open(bus, tiled, tmp_path):
    """The bus stops redelivering a run after ``max_deliver`` (here 1, the first worker's
    ``--max-attempts``) deliveries. Its last worker was killed, so nobody used to close the
    partial derived run: it stayed open for ever, neither done nor failed. The other worker
    hears the bus's advisory and closes it."""
    beamline = "given_up"
    workers = [WorkerProcess(tmp_path / f"w{k}.log", bus.url, tiled, beamline,
                             "--max-attempts", "1") for k in range(2)]
    try:
        for w in workers:
            w.wait_for("ready on", timeout=120)
        uid, killed, other = _scan_killing_the_taker(tiled, bus, beamline, workers, seed=14)
        log = other.text()
        assert re.search(rf"run {uid} given up after 1 deliveries.*replay {uid}", log), log
        assert not re.search(rf"took run {uid} \(delivery", log)  # closed, not redone
        derived = _derived(tiled.client(), uid)
        assert len(derived) == 1, derived
        stop = tiled.client()[derived[0]].stop
        assert stop["exit_status"] == "fail" and "given up after 1 deliveries" in stop["reason"]
        assert asyncio.run(_announcements_left(bus.url, beamline)) == 0
    finally:
        for w in workers:
            w.stop()


def test_a_late_worker_takes_the_backlog_and_rides_out_a_bus_restart(
        pool, bus, tiled, tmp_path):
    for w in pool:  # nobody serves the queue while these runs are taken
        w.stop()
    RE, handle = _engine(tiled, bus.url, BEAMLINE)
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=13)
    uids = [_scan(RE, bl, n_side=5) for _ in range(2)]
    assert handle.flush(30)
    # The files as another host mounts them: the same directory under another prefix.
    mount = tmp_path / "mnt"
    mount.symlink_to(Path(tiled.detector_dir).resolve(), target_is_directory=True)
    late = WorkerProcess(tmp_path / "late.log", bus.url, tiled, BEAMLINE,
                         "--path-map", f"{Path(tiled.detector_dir).resolve()}={mount}")
    try:
        _wait_finished([late], uids)
        assert "frames from" in late.text()
        for uid in uids:
            _assert_one_whole_derived_run(tiled.client(), uid, 25)
        # The bus goes away between runs and comes back (same port, same store): the
        # worker and the publisher reconnect by themselves.
        bus.stop()
        time.sleep(1.5)
        bus.start()
        uid = _scan(RE, bl, n_side=5)
        assert handle.flush(30), handle.stats
        _wait_finished([late], [uid])
        # A run announced again after it was finished (an acknowledgement lost): its complete
        # derived run is kept, not written twice.
        asyncio.run(_announce_again(bus.url, BEAMLINE, uids[0]))
        deadline = time.monotonic() + 60
        while late.runs("finished").count(uids[0]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert re.search(rf"finished run {uids[0]} .*\(kept\)", late.text()), late.text()
        _assert_one_whole_derived_run(tiled.client(), uids[0], 25)
    finally:
        late.stop()
        handle.close()
    assert "lost the bus" in late.text()
    _assert_one_whole_derived_run(tiled.client(), uid, 25)


async def _announce_again(url: str, beamline: str, uid: str) -> None:
    import nats

    from bluesky_ptychopinn.distributed import runs_subject
    from bluesky_ptychopinn.distributed._codec import encode

    nc = await nats.connect(url)
    await nc.jetstream().publish(runs_subject(beamline), encode("run", {"uid": uid}),
                                 headers={"Nats-Msg-Id": f"again:{uid}"})
    await nc.close()


async def _read_run(url: str, beamline: str, uid: str) -> list[tuple[str, dict]]:
    import nats
    from nats.js.api import DeliverPolicy

    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info(docs_stream(beamline), subjects_filter=run_filter(beamline, uid))
    sub = await js.subscribe(run_filter(beamline, uid), ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    out = []
    try:
        while True:
            out.append(decode((await sub.next_msg(timeout=2)).data))
    except asyncio.TimeoutError:
        pass
    # A publish retried with a message id already stored is not stored again.
    ack = await js.publish(f"events.{beamline}.{uid}.stop", b"{}",
                           headers={"Nats-Msg-Id": f"{uid}:{len(out) - 1}"})
    again = await js.stream_info(docs_stream(beamline))
    await nc.close()
    assert ack.duplicate and again.state.messages == info.state.messages == len(out)
    return out


def test_the_bus_down_at_publish_time_loses_and_duplicates_nothing(tiled, tmp_path):
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    RE = RunEngine(call_returns_result=True)
    sent: list[tuple[str, dict]] = []
    RE.subscribe(lambda name, doc: sent.append((name, doc)))
    handle = publish_documents(RE, url, beamline="down")
    bl = sim_beamline("cells", write_path=tiled.detector_dir, seed=14)
    t0 = time.monotonic()
    uid = _scan(RE, bl, n_side=5)
    scan_s = time.monotonic() - t0
    stats = handle.stats
    assert stats.published == 0 and stats.dropped == 0 and not stats.connected
    assert stats.buffered == len(sent) + 1  # every document and the run announcement
    assert scan_s < 30
    with NatsServer(tmp_path / "nats", port=port) as server:
        assert handle.flush(60), handle.stats
        stats = handle.close()
        assert stats.published == len(sent) + 1 and stats.dropped == 0
        received = asyncio.run(_read_run(server.url, "down", uid))
    assert [n for n, _ in received] == [n for n, _ in sent]
    key = {"datum": "datum_id"}
    assert ([d.get(key.get(n, "uid")) for n, d in received]
            == [d.get(key.get(n, "uid")) for n, d in sent])


def test_path_map_rewrites_file_references():
    pm = PathMap([("/acq/data", "/mnt/bl/data")])
    [(_, sr)] = pm("stream_resource", {"uri": "file://localhost/acq/data/scan1/f.h5"})
    assert sr["uri"] == "file://localhost/mnt/bl/data/scan1/f.h5"
    [(_, res)] = pm("resource", {"root": "/acq/data", "resource_path": "x.h5"})
    assert res["root"] == "/mnt/bl/data"
    [(_, other)] = pm("resource", {"root": "/acq/database", "resource_path": "x.h5"})
    assert other["root"] == "/acq/database"  # a prefix, not a string prefix


def test_the_worker_exits_with_a_clear_message_when_a_service_is_unreachable(bus, tiled):
    runner = CliRunner()
    dead_bus = f"nats://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["worker", "--bus", dead_bus, "--tiled", tiled.uri,
                                 "--api-key", tiled.api_key])
    assert result.exit_code == 2 and "cannot reach the bus" in result.output
    result = runner.invoke(app, ["worker", "--bus", bus.url, "--tiled",
                                 f"http://127.0.0.1:{free_port()}/api/v1", "--api-key", "x"])
    assert result.exit_code == 2 and "cannot reach Tiled" in result.output
