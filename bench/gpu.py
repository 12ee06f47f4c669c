"""GPU benchmark in one JSON file: tests/test_cuda.py, the network's throughput (bf16 autocast,
channels_last, torch.compile), the rPIE refiner's epochs/s and the live callback's follow rate.

    bash bench/gpu.sh                      # on the GPU host: environment, stage timeouts, < 5 min
    python bench/gpu.py [--device cuda|cpu] [--quick] [--out DIR] [--stage NAME ...]

Stages (each also alone with ``--stage``): ``info`` (torch, CUDA, GPU, nvidia-smi, cores),
``tests`` (pytest tests/test_cuda.py, log in ``DIR/pytest_cuda.log``), ``network`` (the shipped
default model: bare network at several batch sizes, eager and compiled, and the streaming
engine), ``refiner`` (rPIE epochs/s by batch size on a simulated 1000-frame scan, and the
``StreamingRefiner`` when the package has one), ``live`` (the acquisition rate that
``LiveReconstruction(isolation="thread")`` follows, fed real event-model documents, and step
scans of a RunEngine with the simulated beamline at a few exposure times).

Results are merged into ``DIR/gpu.json`` (default ``$OUT``, else bench/results/gpu) after
every measurement, so a stage killed by its timeout keeps what it had measured
(``"complete": false``). A stage that raises records ``error`` and the next one still runs;
``--record-error STAGE MESSAGE`` is how bench/gpu.sh records a stage it had to kill.
``--device cpu --quick`` runs every stage at toy sizes on the CPU (tests/test_gpu_bench.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STAGES = ("info", "tests", "network", "refiner", "live")
RESULT_NAME = "gpu.json"
PYTEST_LOG = "pytest_cuda.log"

# Sizes: (full run on a GPU, --quick run). Batches of the bare network count network inputs
# (groups of C frames for the C = 4 default model).
NETWORK_BATCHES = ((256, 512, 1024, 2048, 4096), (8, 32))
# torch.compile recompiles for every batch size (dynamic=False): the most telling ones first
COMPILE_BATCHES = ((1024, 4096, 256), (8, 32))
STREAM_BATCHES = ((256, 1024, 4096), (64,))
STREAM_FRAMES = (4096, 256)
REFINER_FRAMES = (1000, 100)
REFINER_BATCHES = ((16, 32, 64, 128, 256), (16, 64))
REFINER_EPOCHS = (10, 2)
REFINER_STREAM_BATCHES = ((16, 64, 256), (16,))
LIVE_FRAMES = (4000, 200)
LIVE_RATES = ((1000.0, 2000.0, 4000.0, 8000.0), (100.0, 400.0))
RUNENGINE_SIDE = (20, 5)  # raster side: 400 / 25 points
RUNENGINE_EXPOSURES = ((0.0, 0.001, 0.005), (0.0,))


# -- the results file -------------------------------------------------------------------------
def load(out: Path) -> dict:
    path = out / RESULT_NAME
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data.setdefault("stages", {})
            return data
    except (OSError, ValueError):
        pass
    return {"stages": {}}


def save(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RESULT_NAME + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, out / RESULT_NAME)


def _jsonable(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _parse(value: str):
    """A number when it reads as one (``--note setup_s 12``), else the string."""
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        return value


def record_error(out: Path, stage: str, message: str) -> None:
    """Add an error to a stage, keeping whatever it had measured before it was stopped."""
    data = load(out)
    rec = data["stages"].setdefault(stage, {})
    rec["error"] = f"{rec['error']}; {message}" if rec.get("error") else message
    rec["ok"] = False
    rec["complete"] = False
    save(out, data)


class Context:
    """What every stage gets: device, sizes, a soft deadline and a way to save progress."""

    def __init__(self, args, stage: str, data: dict) -> None:
        import torch

        self.args, self.stage, self.data = args, stage, data
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.quick = bool(args.quick)
        self.size = 1 if self.quick else 0  # index into the (full, quick) size tuples
        self.out = Path(args.out)
        self.start = time.perf_counter()
        self.budget_s = args.budget_s
        self.rec: dict = {"ok": None, "complete": False}
        data["stages"][stage] = self.rec

    def left(self) -> float:
        if self.budget_s is None:
            return math.inf
        return self.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.rec["seconds"] = time.perf_counter() - self.start
        save(self.out, self.data)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def require_device(self) -> None:
        import torch

        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError(f"--device {self.args.device}: torch {torch.__version__} sees "
                               "no CUDA GPU (torch.cuda.is_available() is False)")


def _throughput(fn, items: int, sync, min_s: float) -> tuple[float, int]:
    """items/s of ``fn`` after a warm-up: timed runs of 3, 6, 12... calls until one lasts
    ``min_s``; the rate of the last (longest) one, and its number of calls."""
    fn()
    sync()
    reps = 3
    while True:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        elapsed = time.perf_counter() - t
        if elapsed >= min_s or reps >= 384:
            return items * reps / elapsed, reps
        reps *= 2


# -- stages -------------------------------------------------------------------------------------
def stage_info(ctx: Context) -> None:
    import torch

    rec = ctx.rec
    rec.update({
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda_version": torch.version.cuda,
        "cudnn_version": (torch.backends.cudnn.version()
                          if torch.backends.cudnn.is_available() else None),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else None),
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "pythonpath": os.environ.get("PYTHONPATH"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
    })
    try:
        from core import machine

        rec["machine"] = machine()
    except Exception as exc:  # bench/core.py imports more of the package than this stage needs
        rec["machine"] = f"unknown ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update({"gpu_name": torch.cuda.get_device_name(0), "gpu_count":
                    torch.cuda.device_count(), "gpu_capability": list(
                        torch.cuda.get_device_capability(0)),
                    "gpu_memory_gib": props.total_memory / 2**30,
                    "gpu_multiprocessors": props.multi_processor_count,
                    "bf16_supported": torch.cuda.is_bf16_supported()})
    else:
        rec["gpu_name"] = None
    for name, args in (("nvidia_smi", []),
                       ("nvidia_smi_query", ["--query-gpu=name,driver_version,memory.total,"
                                             "clocks.max.sm,power.limit", "--format=csv"])):
        try:
            proc = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True,
                                  timeout=20)
            rec[name] = (proc.stdout or proc.stderr).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            rec[name] = f"not available: {type(exc).__name__}: {exc}"
    versions = {}
    from importlib import metadata

    for dist in ("numpy", "scipy", "pydantic", "bluesky", "ophyd", "event-model", "h5py",
                 "safetensors", "pytest", "triton"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    rec["packages"] = versions
    try:
        rec["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rec["git_commit"] = None


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line ("2 passed, 1 skipped in 3.1s")."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    lines = [ln for ln in text.splitlines() if re.search(r"\bin [\d.]+s\b", ln)]
    summary = lines[-1].strip("= ") if lines else ""
    for number, kind in _SUMMARY.findall(summary):
        kind = "errors" if kind.startswith("error") else kind
        counts[kind] = counts.get(kind, 0) + int(number)
    return {"summary": summary, **counts}


def stage_tests(ctx: Context) -> None:
    rec = ctx.rec
    log = ctx.out / PYTEST_LOG
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
           "tests/test_cuda.py"]
    rec.update({"command": " ".join(cmd[2:]), "log": log.name})
    timeout = None if math.isinf(ctx.left()) else max(ctx.left() - 2, 5)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = _text(exc.stdout) + _text(exc.stderr) + f"\n[timed out after {timeout:.0f} s]\n"
        rc = None
    ctx.out.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    rec.update(parse_pytest_summary(text), rc=rc)
    rec["total"] = sum(rec[k] for k in ("passed", "failed", "skipped", "errors"))
    if rec["skipped"] and rec["skipped"] == rec["total"]:
        rec["note"] = "every test skipped (they need a CUDA GPU)"
        if ctx.cuda:
            raise RuntimeError(f"--device {ctx.args.device}, but pytest skipped every test: "
                               "its torch sees no GPU")
    if rc is None:
        raise RuntimeError(f"pytest timed out after {timeout:.0f} s (log: {log.name})")
    if rc != 0:
        raise RuntimeError(f"pytest exited {rc}: {rec['summary'] or text[-300:]}")
    if rec["total"] == 0:
        raise RuntimeError(f"no test result in pytest's output: {text[-300:]}")


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _scan_frames(n_frames: int, object_px: int = 512):
    """The scene of bench/inference.py: cells, zone-plate probe, Fermat spiral, 1e6 photons."""
    import numpy as np

    from bluesky_ptychopinn import physics
    from bluesky_ptychopinn.synthetic import make_object

    obj = make_object("cells", (object_px, object_px), seed=0)
    probe = physics.make_probe("zone_plate", 64, 44e-9, 8_800)
    span = object_px - 112.0
    pos = physics.fermat_spiral_scan((span, span), span / np.sqrt(n_frames)) + object_px / 2
    pos = pos[:n_frames]
    counts = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0).counts
    return counts, pos


def stage_network(ctx: Context) -> None:
    import numpy as np
    import torch

    from bluesky_ptychopinn.models import ModelRegistry
    from bluesky_ptychopinn.recon import StreamingReconstructor

    ctx.require_device()
    rec, device, sync = ctx.rec, ctx.device, ctx.sync
    model, card = ModelRegistry().load("default")
    c, n = model.config.channels, model.config.frame_size
    pool, pos = _scan_frames(STREAM_FRAMES[ctx.size])
    scale = math.sqrt(n * n / float(pool[:16].flatten(1).sum(1).mean()))
    rec.update({"model": "default", "channels": c, "frame_size": n,
                "parameters": card.get("n_parameters"), "input_scale": scale,
                "device": str(device), "layout": "channels_last",
                "batch_unit": f"network inputs (groups of {c} frames)",
                # "fp32" convolutions run in TF32 on Ampere+ when cuDNN allows it (the default)
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "cudnn_benchmark": torch.backends.cudnn.benchmark})
    min_s = 0.05 if ctx.quick else 0.3
    rng = np.random.default_rng(0)
    net = model.to(device).eval().to(memory_format=torch.channels_last)
    # bf16 autocast on CUDA, as the streaming engine; on the CPU too, so the path runs there
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    inputs = {}
    for batch in NETWORK_BATCHES[ctx.size]:
        idx = torch.from_numpy(rng.integers(len(pool), size=(batch, c)))
        inputs[batch] = pool[idx].to(device).contiguous(memory_format=torch.channels_last)

    def measure(fn, batch: int, precision: str) -> dict:
        x = inputs[batch]
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad(), (bf16 if precision == "bf16" else _null()):
            rate, reps = _throughput(lambda: fn(x, scale), batch, sync, min_s)
        out = {"batch": batch, "precision": precision, "groups_per_s": rate,
               "frames_per_s": rate * c, "ms_per_batch": 1e3 * batch / rate, "calls": reps}
        if ctx.cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out

    for precision in ("bf16", "fp32"):
        key = f"eager_{precision}"
        rec[key] = []
        for batch in NETWORK_BATCHES[ctx.size]:
            rec[key].append(measure(net.forward_parts, batch, precision))
            ctx.save()
    for row, ref in zip(rec["eager_bf16"], rec["eager_fp32"], strict=True):
        row["speedup_vs_fp32"] = row["groups_per_s"] / ref["groups_per_s"]

    # The streaming engine: network + 4-quadrant grouping + stitching, every frame an anchor.
    rec["streaming"] = []
    for batch in STREAM_BATCHES[ctx.size]:
        def stream(batch=batch):
            recon = StreamingReconstructor(model, object_shape=(512, 512), batch_size=batch,
                                           device=device)
            t = time.perf_counter()
            for lo in range(0, len(pos), batch):
                recon.add(pool[lo: lo + batch], pos[lo: lo + batch])
            recon.finish()
            sync()
            return len(pos) / (time.perf_counter() - t), recon.stats()

        stream()  # warm-up (kernels, allocator)
        fps, stats = max((stream() for _ in range(2)), key=lambda r: r[0])
        rec["streaming"].append({"batch": batch, "frames": len(pos), "frames_per_s": fps,
                                 "batch_latency_p50_s": stats["batch_latency_p50_s"],
                                 "device": stats["device"]})
        ctx.save()
        if ctx.left() < 10:
            rec["streaming_note"] = "remaining batch sizes skipped: stage budget"
            break

    rec["compile"] = compile_network(ctx, net, measure, inputs)
    ctx.save()


def _null():
    from contextlib import nullcontext

    return nullcontext()


def compile_network(ctx: Context, net, measure, inputs: dict) -> dict:
    """torch.compile of the bare network, per batch size: compile time, compiled throughput,
    speed-up over eager bf16 and the groups after which the compile has paid for itself."""
    import torch

    choice = ctx.args.compile
    if choice == "off" or (choice == "auto" and not ctx.cuda and ctx.quick):
        return {"skipped": "--compile off" if choice == "off" else
                "not tried on the CPU with --quick (an inductor C++ build takes minutes; "
                "--compile on forces it)"}
    result: dict = {"mode": ctx.args.compile_mode, "dynamic": False, "batches": []}
    ctx.rec["compile"] = result
    eager = {row["batch"]: row for row in ctx.rec["eager_bf16"]}
    compiled = torch.compile(net.forward_parts, mode=ctx.args.compile_mode, dynamic=False)
    bf16 = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    for batch in COMPILE_BATCHES[ctx.size]:
        if ctx.left() < 20:
            result["note"] = "remaining batch sizes skipped: stage budget"
            break
        row = {"batch": batch}
        try:
            t = time.perf_counter()
            with torch.no_grad(), bf16:
                compiled(inputs[batch], ctx.rec["input_scale"])
            ctx.sync()
            first_call_s = time.perf_counter() - t
            row.update(measure(compiled, batch, "bf16"))
            per_call = batch / row["groups_per_s"]
            row["compile_s"] = max(first_call_s - per_call, 0.0)
            ref = eager[batch]["groups_per_s"]
            row["speedup_vs_eager_bf16"] = row["groups_per_s"] / ref
            saved_per_group = 1 / ref - 1 / row["groups_per_s"]
            row["break_even_groups"] = (row["compile_s"] / saved_per_group
                                        if saved_per_group > 0 else None)
            row["pays"] = row["speedup_vs_eager_bf16"] > 1.05
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        result["batches"].append(row)
        ctx.save()
    result["batches"].sort(key=lambda r: r["batch"])
    good = [r for r in result["batches"] if "speedup_vs_eager_bf16" in r]
    if good:
        result["pays_at_batches"] = [r["batch"] for r in good if r["pays"]]
        result["best_speedup"] = max(r["speedup_vs_eager_bf16"] for r in good)
        result["pays"] = bool(result["pays_at_batches"])
    elif result["batches"]:
        result["error"] = result["batches"][0].get("error", "no batch compiled")
    return result


def _refiner_scan(n_frames: int):
    """A simulated Fermat scan of ``n_frames`` positions with a 5-px step (high overlap, as in
    tests/test_cuda.py) over a dead-leaves object: frames, positions (px), probe, object."""
    import numpy as np

    from bluesky_ptychopinn import physics
    from bluesky_ptychopinn.synthetic import make_object

    step = 5.0
    extent = math.ceil(step * math.sqrt(4 * n_frames / math.pi)) + 2 * step
    side = int(extent) + 64 + 16
    pos = physics.fermat_spiral_scan((extent, extent), step)[:n_frames] + side / 2
    obj = make_object("dead_leaves", (side, side), seed=0, amp_range=(0.7, 1.0),
                      phase_range=(-1.0, 1.0))
    probe = physics.make_probe("zone_plate", 64, 44e-9, 8_800)
    counts = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0).counts
    return counts.numpy(), np.asarray(pos), probe, obj


def stage_refiner(ctx: Context) -> None:
    from bluesky_ptychopinn import recon
    from bluesky_ptychopinn.recon import PIEOptions, pie_reconstruct

    ctx.require_device()
    rec = ctx.rec
    frames, pos, probe, obj = _refiner_scan(REFINER_FRAMES[ctx.size])
    epochs = REFINER_EPOCHS[ctx.size]
    rec.update({"engine": "rpie", "frames": len(pos), "object_shape": list(obj.shape),
                "frame_size": int(frames.shape[-1]), "epochs": epochs, "probe_update": False,
                "device": str(ctx.device), "rpie": []})
    for batch in REFINER_BATCHES[ctx.size]:
        def run(n_epochs: int, batch=batch):
            return pie_reconstruct(frames, pos, probe, object_shape=obj.shape, options=PIEOptions(
                engine="rpie", n_epochs=n_epochs, batch_size=batch, probe_update=False, seed=0,
                device=str(ctx.device), progress=False))

        run(1)  # warm-up: kernels, allocator
        t = time.perf_counter()
        result = run(epochs)
        ctx.sync()
        wall = time.perf_counter() - t
        per_epoch = result.timings["iterate_s"] / epochs
        rec["rpie"].append({"batch_size": batch, "epochs_per_s": 1 / per_epoch,
                            "frame_updates_per_s": len(pos) / per_epoch,
                            "setup_s": result.timings.get("setup_s"), "wall_s": wall,
                            "final_amplitude_error": result.error_history[-1],
                            "device": result.device})
        ctx.save()
        if ctx.left() < 8:
            rec["note"] = "remaining batch sizes skipped: stage budget"
            break
    rec["streaming_refiner"] = {}
    streaming_refiner(ctx, rec["streaming_refiner"], recon, frames, pos, probe, obj.shape)
    ctx.save()


def streaming_refiner(ctx: Context, out: dict, recon, frames, pos, probe, shape) -> None:
    """``recon.StreamingRefiner`` (when the package has one): all frames added, a first step
    (which also picks the starting object), then epochs/s over a timed ``step(budget_s)``."""
    import inspect

    from bluesky_ptychopinn.recon import PIEOptions

    if not hasattr(recon, "StreamingRefiner"):
        out.update(available=False,
                   note="not available: bluesky_ptychopinn.recon has no StreamingRefiner")
        return
    out.update(available=True, frames=len(pos), probe_update=False, batches=[])
    try:
        cls = recon.StreamingRefiner
        takes_device = "device" in inspect.signature(cls).parameters
        for batch in REFINER_STREAM_BATCHES[ctx.size]:
            if ctx.left() < 6:
                out["note"] = "remaining batch sizes skipped: stage budget"
                break
            if takes_device:
                refiner = cls(probe, object_shape=tuple(shape), device=str(ctx.device))
            else:
                refiner = cls(probe, object_shape=tuple(shape), options=PIEOptions(
                    engine="rpie", batch_size=batch, probe_update=False, seed=0,
                    device=str(ctx.device), progress=False))
            refiner.add(frames, pos)
            t = time.perf_counter()
            refiner.step(0.1 if ctx.quick else 0.3)  # also chooses the start, warms kernels
            ctx.sync()
            first_s = time.perf_counter() - t
            budget = 0.3 if ctx.quick else min(2.0, max(ctx.left() - 5, 0.3))
            e0 = refiner.epochs
            t = time.perf_counter()
            error = refiner.step(budget)
            ctx.sync()
            elapsed = time.perf_counter() - t
            epochs = refiner.epochs - e0
            out["batches"].append({
                "batch_size": batch if not takes_device else None, "first_step_s": first_s,
                "step_budget_s": budget, "elapsed_s": elapsed, "epochs": epochs,
                "epochs_per_s": epochs / elapsed, "amplitude_error": _number(error),
                "start": getattr(refiner, "start", None)})
            ctx.save()
        if out["batches"]:
            out["epochs_per_s"] = max(r["epochs_per_s"] for r in out["batches"])
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-1500:]


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def stage_live(ctx: Context) -> None:
    import numpy as np

    from bluesky_ptychopinn import physics
    from bluesky_ptychopinn.callbacks import LiveReconstruction
    from bluesky_ptychopinn.devices import sim_beamline

    ctx.require_device()
    from live import feed  # bench/live.py: real event-model documents at a fixed rate

    rec = ctx.rec
    batch = 256 if ctx.cuda else 64
    bl = sim_beamline("cells", sample_shape=(256, 256))
    n = LIVE_FRAMES[ctx.size]
    dx = bl.pixel_size_m
    pos_m = physics.fermat_spiral_scan((150 * dx, 150 * dx), 150 * dx / np.sqrt(n))[:n]
    pos_px = physics.stage_to_pixels(pos_m, dx, origin_px=bl.detector.sample_origin_px)
    sim = physics.simulate_diffraction(bl.sample, bl.probe, pos_px, photons=1e6, seed=0)
    frames = sim.counts.numpy().astype(np.uint32)
    rec.update({"isolation": "thread", "device": str(ctx.device), "batch_size": batch,
                "frames": len(frames), "page": 16,
                "followed_means": "no frame skipped, derived run done < 1 s after the last frame "
                                  "(bench/live.py)", "rate_sweep": []})

    def make_live():
        return LiveReconstruction("default", batch_size=batch, snapshot_every=512,
                                  device=str(ctx.device), max_queue=400, isolation="thread")

    for rate in LIVE_RATES[ctx.size]:
        live = make_live()
        try:
            row = feed(live, bl, frames, pos_m, rate)
        finally:
            live.close()
        acquire_s = len(frames) / rate
        elapsed = acquire_s + row["lag_after_last_frame_s"]
        row["reconstructed_frames_per_s"] = row["done"] / elapsed
        rec["rate_sweep"].append(row)
        ctx.save()
        if ctx.left() < 25:
            rec["note"] = "remaining rates skipped: stage budget"
            break
    followed = [r["rate"] for r in rec["rate_sweep"] if r["followed"]]
    rec["max_rate_followed_frames_per_s"] = max(followed, default=0.0)
    rec["best_reconstructed_frames_per_s"] = max(r["reconstructed_frames_per_s"]
                                                 for r in rec["rate_sweep"])
    ctx.save()
    rec["runengine"] = []
    for exposure in RUNENGINE_EXPOSURES[ctx.size]:
        if ctx.left() < 10:
            rec["runengine_note"] = "remaining exposures skipped: stage budget"
            break
        rec["runengine"].append(runengine_scan(ctx, make_live, exposure))
        ctx.save()


def runengine_scan(ctx: Context, make_live, exposure: float) -> dict:
    """One step scan of the simulated beamline (inline images) with the live callback."""
    from bluesky import RunEngine

    from bluesky_ptychopinn.devices import sim_beamline
    from bluesky_ptychopinn.plans import ptycho_scan

    side = RUNENGINE_SIDE[ctx.size]
    bl = sim_beamline("cells", write_path=None)
    bl.detector.dead_time = exposure  # the RunEngine waits on the detector, as at a beamline
    live = make_live()
    try:
        RE = RunEngine()
        RE.subscribe(live)
        dx = bl.pixel_size_m
        t = time.perf_counter()
        RE(ptycho_scan(bl.detector, bl.stage, geometry=bl.ptycho_metadata(), pattern="raster",
                       extent_m=(4 * dx * (side - 1),) * 2, step_m=4 * dx))
        scan_s = time.perf_counter() - t
        state = live.wait(timeout=120)
        lag = time.perf_counter() - t - scan_s
    finally:
        live.close()
    points = side * side
    return {"exposure_s": exposure, "points": points, "scan_s": scan_s,
            "acquired_frames_per_s": points / scan_s, "frames_done": state.frames_done,
            "frames_skipped": state.frames_skipped, "failed": state.failed,
            "lag_after_scan_s": lag,
            "reconstructed_frames_per_s": state.frames_done / (scan_s + lag),
            "followed": state.frames_done == points and lag < 1.0 and not state.failed}


STAGE_FUNCTIONS = {"info": stage_info, "tests": stage_tests, "network": stage_network,
                   "refiner": stage_refiner, "live": stage_live}


def run_stage(args, stage: str) -> bool:
    old = load(Path(args.out))
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    data = {"schema": "bench/gpu.py 1", "device": args.device, "quick": bool(args.quick),
            "started": old.get("started", now), "updated": now}
    data.update({k: v for k, v in old.items() if k not in data and k != "stages"})
    data["stages"] = old["stages"]  # last, after the header
    ctx = Context(args, stage, data)
    print(f"[gpu.py] stage {stage} on {args.device}{' (quick)' if args.quick else ''}",
          flush=True)
    try:
        STAGE_FUNCTIONS[stage](ctx)
        ctx.rec.update(ok=True, complete=True)
    except Exception as exc:
        ctx.rec.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc()[-3000:])
        print(ctx.rec["traceback"], file=sys.stderr, flush=True)
    ctx.save()
    print(f"[gpu.py] stage {stage}: {'ok' if ctx.rec['ok'] else ctx.rec['error']} "
          f"({ctx.rec['seconds']:.1f} s)", flush=True)
    return bool(ctx.rec["ok"])


# -- summary ------------------------------------------------------------------------------------
def summary(data: dict) -> str:
    """A few lines of the headline numbers (printed at the end of bench/gpu.sh)."""
    lines = []
    stages = data.get("stages", {})
    for name in STAGES:
        rec = stages.get(name)
        if rec is None:
            lines.append(f"{name}: not run")
            continue
        head = f"{name}: {'ok' if rec.get('ok') else 'ERROR ' + str(rec.get('error'))[:200]}"
        if rec.get("seconds") is not None:
            head += f" ({rec['seconds']:.1f} s)"
        lines.append(head)
        if name == "info":
            lines.append(f"  {rec.get('gpu_name')} | torch {rec.get('torch_version')} | CUDA "
                         f"{rec.get('torch_cuda_version')} | {rec.get('cpu_count')} cores")
        elif name == "tests" and "summary" in rec:
            lines.append(f"  {rec['summary']}")
        elif name == "network":
            for key in ("eager_bf16", "eager_fp32"):
                for row in rec.get(key, []):
                    lines.append(f"  {key} batch {row['batch']:5d}: {row['groups_per_s']:10.0f} "
                                 f"groups/s ({row['frames_per_s']:.0f} frames/s)")
            for row in rec.get("streaming", []):
                lines.append(f"  streaming batch {row['batch']:5d}: {row['frames_per_s']:10.0f} "
                             "frames/s")
            comp = rec.get("compile", {})
            for row in comp.get("batches", []):
                if "groups_per_s" in row:
                    lines.append(f"  compiled batch {row['batch']:5d}: "
                                 f"{row['groups_per_s']:10.0f} groups/s, x"
                                 f"{row['speedup_vs_eager_bf16']:.2f} vs eager, compile "
                                 f"{row['compile_s']:.1f} s")
                else:
                    lines.append(f"  compiled batch {row['batch']}: {row.get('error')}")
            if "skipped" in comp:
                lines.append(f"  compile: skipped ({comp['skipped']})")
        elif name == "refiner":
            for row in rec.get("rpie", []):
                lines.append(f"  rPIE batch {row['batch_size']:4d}: {row['epochs_per_s']:8.2f} "
                             f"epochs/s ({rec.get('frames')} frames)")
            sr = rec.get("streaming_refiner", {})
            if sr:
                lines.append("  StreamingRefiner: " + (
                    f"{sr['epochs_per_s']:.2f} epochs/s" if "epochs_per_s" in sr
                    else str(sr.get("error") or sr.get("note"))[:200]))
        elif name == "live":
            for row in rec.get("rate_sweep", []):
                lines.append(f"  fed {row['rate']:7.0f} frames/s: reconstructed "
                             f"{row['reconstructed_frames_per_s']:7.0f} frames/s, skipped "
                             f"{row['skipped']}, lag {row['lag_after_last_frame_s']:.2f} s, "
                             f"followed {row['followed']}")
            if "max_rate_followed_frames_per_s" in rec:
                lines.append(f"  max rate followed: {rec['max_rate_followed_frames_per_s']:.0f} "
                             "frames/s")
            for row in rec.get("runengine", []):
                lines.append(f"  RunEngine exposure {row['exposure_s'] * 1e3:.0f} ms: acquired "
                             f"{row['acquired_frames_per_s']:.0f} frames/s, reconstructed "
                             f"{row['reconstructed_frames_per_s']:.0f} frames/s, followed "
                             f"{row['followed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=os.environ.get("BENCH_DEVICE", "cuda"),
                        help="cuda (default; env BENCH_DEVICE) or cpu")
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" /
                                                                      "results" / "gpu"),
                        help="directory of gpu.json and pytest_cuda.log (default $OUT, else "
                             "bench/results/gpu)")
    parser.add_argument("--stage", action="append", choices=STAGES,
                        help="run only this stage (repeatable; default all, in a fresh gpu.json)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="soft time budget of each stage: optional parts are skipped")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the network (auto: yes, except on the CPU --quick)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--record-error", nargs=2, metavar=("STAGE", "MESSAGE"),
                        help="add an error to a stage of gpu.json (bench/gpu.sh, after a kill)")
    parser.add_argument("--note", nargs=2, action="append", metavar=("KEY", "VALUE"),
                        help="set a top-level entry of gpu.json (bench/gpu.sh: setup time...)")
    parser.add_argument("--summary", action="store_true",
                        help="print gpu.json's headline numbers; status 1 if a stage failed")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.record_error or args.note:
        if args.record_error:
            record_error(out, *args.record_error)
        if args.note:
            data = load(out)
            data.update({key: _parse(value) for key, value in args.note})
            save(out, data)
        return 0
    if args.summary:
        data = load(out)
        print(summary(data))
        failed = [s for s in STAGES if not data["stages"].get(s, {}).get("ok")]
        return 1 if failed else 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stages = args.stage or list(STAGES)
    if not args.stage:  # a full run starts a fresh file
        (out / RESULT_NAME).unlink(missing_ok=True)
    for stage in stages:
        run_stage(args, stage)
    if not args.stage:
        print(summary(load(out)))
    print(f"[gpu.py] results: {out / RESULT_NAME}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
