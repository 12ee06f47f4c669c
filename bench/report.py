"""Append the inference and live-pipeline sections of docs/performance.md from
bench/results/{inference,live}.json (written by bench/inference.py and bench/live.py).

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- pipeline-bench -->"


def section() -> str:
    inf = json.loads((ROOT / "bench/results/inference.json").read_text())
    live = json.loads((ROOT / "bench/results/live.json").read_text())
    where = ("in a separate process" if live.get("isolation", "thread") == "process"
             else "in a thread of the feeding process")
    command = ".venv/bin/python " + live.get("command", "bench/live.py").strip()
    if live.get("os_nice", 0):
        command = f"nice -n {live['os_nice']} {command}"
    lines = [
        MARKER, "## Inference (`bench/inference.py`)", "",
        f"Machine: {inf['machine']}; torch threads {inf['threads']}; batch {inf['batch']}; "
        f"measured {inf['date']}.", "",
        f"- default model ({inf['parameters']} parameters, C = {inf['channels']}): "
        f"**{inf['streaming_frames_per_s']:.0f} frames/s** of 64x64 through the streaming "
        f"engine (network + 4-quadrant grouping + stitching, {inf['frames']} frames); "
        "target >= 1,000",
        f"- bare network: {inf['network_groups_per_s']:.0f} groups of 4 frames per second "
        "in the channels_last layout the engine uses; "
        f"{inf.get('network_groups_per_s_contiguous', float('nan')):.0f} in torch's default "
        "layout, same run",
        f"- batch latency p50: {inf['batch_latency_p50_s'] * 1e3:.0f} ms for {inf['batch']} "
        "frames", "",
        "## Live keep-up (`bench/live.py`)", "",
        f"Machine: {live['machine']}; reconstruction on 1 torch thread (the other core runs the "
        f"RunEngine), {where}; measured {live['date']}.", "",
        "| acquisition (frames/s) | frames | skipped | derived run done after last frame (s) "
        "| followed |",
        "|---|---|---|---|---|",
    ]
    for r in live["rate_sweep"]:
        lines.append(f"| {r['rate']:.0f} | {r['frames']} | {r['skipped']} | "
                     f"{r['lag_after_last_frame_s']:.2f} | {'yes' if r['followed'] else 'no'} |")
    lines += [
        "", "Maximum rate followed with no frame dropped and the derived run complete within "
        f"1 s: **{live['max_rate_followed_frames_per_s']:.0f} frames/s** (target >= 500).", "",
        "RunEngine slow-down: the same step scan without the callback, with the reconstruction in "
        "a thread of the RunEngine's process (`isolation=\"thread\"`) and in a separate process "
        "(`isolation=\"process\"`, the default), each configuration in its own process set up "
        "before any timing, their scans interleaved in one invocation "
        f"(`{command}`, measured {live.get('runengine_date', live['date'])}). The control "
        "*busy core* is the scan without the callback while another process spins on the other "
        "core: what any computation beside the RunEngine on these 2 cores costs.", "",
        "Slow-down = median over the repeats of (scan time / the scan without the callback in the "
        "same repeat); in brackets the 25th-75th percentiles of that ratio.", "",
        "*thread* and *process* run the network and the refinement tier (rPIE beside it, the "
        "default); *process, network only* is `refine=None`.", "",
        "| detector | points | repeats | without (s, median) | slow-down: busy core | thread "
        "| process | process, network only |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pct(r: dict, label: str, bold: bool = False) -> str:
        mid = f"{r['slowdown_percent'][label]:.1f} %"
        lo, hi = r["slowdown_percent_iqr"][label]
        return f"{'**' + mid + '**' if bold else mid} ({lo:.1f} to {hi:.1f} %)"

    for r in live["runengine"]:
        kind = ("CPU-bound simulation, no exposure" if r["exposure_s"] == 0
                else f"{r['exposure_s'] * 1e3:.0f} ms exposure")
        lines.append(f"| {kind} | {r['points']} | {r['repeats']} | "
                     f"{r['seconds_median']['without']:.3f} | {pct(r, 'busy_core')} | "
                     f"{pct(r, 'thread')} | {pct(r, 'process', bold=True)} | "
                     + (f"{pct(r, 'process-network')} |"
                        if "process-network" in r["slowdown_percent"] else "- |"))
    exposed = [r for r in live["runengine"] if r["exposure_s"] > 0]
    cpu_bound = [r for r in live["runengine"] if r["exposure_s"] == 0]
    lat = live["latency"]
    for r in exposed:
        slow = r["slowdown_percent"]
        ok = slow["process"] < 5
        lines += [
            "", f"Target < 5 % with a {r['exposure_s'] * 1e3:.0f} ms exposure (the RunEngine waits "
            f"on the detector, as at a beamline): **{'met' if ok else 'not met'}** with the "
            f"reconstruction in a separate process ({slow['process']:.1f} %; in a thread "
            f"{slow['thread']:.1f} %). The scan without the callback took "
            f"{min(r['seconds_all']['without']):.2f} to {max(r['seconds_all']['without']):.2f} s "
            "over the repeats: single scans on this shared machine vary by several percent, "
            "which is why only paired medians are quoted.",
        ]
    for r in cpu_bound:
        slow = r["slowdown_percent"]
        lines += [
            "", f"With the CPU-bound simulated detector the scan itself uses both cores, and a "
            f"process merely spinning on one of them slows it by {slow['busy_core']:.1f} %: "
            f"that is the floor for any reconstruction on the same 2 cores. The separate process "
            f"costs {slow['process']:.1f} % (thread: {slow['thread']:.1f} %, where the "
            "reconstruction also holds the RunEngine's interpreter lock). Below the floor takes "
            "cores the scan does not use (more cores, a GPU, or another machine).",
        ]
    busy = max(live.get("other_cpu_busy_cores_before", 0.0),
               live.get("other_cpu_busy_cores_after_runengine", 0.0))
    if busy > 0.25:
        lines += [
            "", f"These slow-down figures were taken while other processes kept {busy:.1f} of "
            f"the 2 cores busy (the benchmark ran at nice {live.get('os_nice', 0)}): they are "
            "those of a loaded machine; re-run the command on an idle machine for the figure "
            "the target refers to.",
        ]
    lines += [
        "", "Latency from a frame's acquisition to the Tiled snapshot containing it (snapshot "
        f"every {lat.get('snapshot_every', 64)} frames, at most one per "
        f"{lat.get('publish_interval_s', 0):g} s, acquisition at {lat['rate']:.0f} frames/s, "
        "TiledWriter to the embedded server; the latency of the newest frame in each snapshot, "
        f"i.e. how old the image on screen is): p50 **{lat['latency_p50_s'] * 1e3:.0f} ms**, p99 "
        f"**{lat['latency_p99_s'] * 1e3:.0f} ms** ({lat['snapshots']} snapshots).",
    ]
    if "thread" in live:
        t = live["thread"]
        lines += [
            "", "The same with the reconstruction in a thread, in the same invocation: at "
            f"{t['rate_1000']['rate']:.0f} frames/s the derived run was done "
            f"{t['rate_1000']['lag_after_last_frame_s']:.2f} s after the last frame; latency p50 "
            f"{t['latency']['latency_p50_s'] * 1e3:.0f} ms, p99 "
            f"{t['latency']['latency_p99_s'] * 1e3:.0f} ms.",
        ]
    lines += [MARKER]
    return "\n".join(lines)


def main() -> None:
    path = ROOT / "docs" / "performance.md"
    text = path.read_text()
    if MARKER in text:
        head, _, rest = text.partition(MARKER)
        _, _, tail = rest.partition(MARKER)
        text = head + section() + tail
    else:
        text = text.rstrip() + "\n\n" + section() + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
