"""Append the inference and live-pipeline sections of docs/performance.md from
bench/results/{inference,live}.json (written by bench/inference.py and bench/live.py), and the
time-to-quality section from bench/results/quality.json (bench/quality.py) when it exists.

    .venv/bin/python bench/report.py [--quality-only]

``--quality-only`` rewrites only the time-to-quality section (the other sections stay as they
are, whatever the other JSON files now hold).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- pipeline-bench -->"
QUALITY_MARKER = "<!-- quality-bench -->"


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
        f"(`{command}`, measured {live.get('runengine_date', live['date'])} on "
        f"{live.get('runengine_machine', live['machine'])}). The control "
        "*busy core* is the scan without the callback while another process spins on the other "
        "core: what any computation beside the RunEngine on these 2 cores costs.", "",
        "Slow-down = median over the repeats of (scan time / the scan without the callback in the "
        "same repeat); in brackets the 25th-75th percentiles of that ratio.", "",
        "*thread* and *process* run the network and the refinement tier (rPIE beside it, the "
        "default); *process* keeps one core for the RunEngine (`reserve_cores=1`, the default: "
        "the reconstruction process is pinned to the other core), *process, all cores* lets it "
        "use both (`reserve_cores=0`); *process, network only* is `refine=None`.", "",
        "| detector | points | repeats | without (s, median) | slow-down: busy core | thread "
        "| process | process, all cores | process, network only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r: dict, label: str) -> str:
        return f" {pct(r, label)} |" if label in r["slowdown_percent"] else " - |"


    def pct(r: dict, label: str, bold: bool = False) -> str:
        mid = f"{r['slowdown_percent'][label]:.1f} %"
        lo, hi = r["slowdown_percent_iqr"][label]
        return f"{'**' + mid + '**' if bold else mid} ({lo:.1f} to {hi:.1f} %)"

    for r in live["runengine"]:
        kind = ("CPU-bound simulation, no exposure" if r["exposure_s"] == 0
                else f"{r['exposure_s'] * 1e3:.0f} ms exposure")
        lines.append(f"| {kind} | {r['points']} | {r['repeats']} | "
                     f"{r['seconds_median']['without']:.3f} | {pct(r, 'busy_core')} | "
                     f"{pct(r, 'thread')} | {pct(r, 'process', bold=True)} |"
                     + cell(r, "process-allcores") + cell(r, "process-network"))
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
            f"{slow['thread']:.1f} %)"
            + (f"; the same process allowed on both cores (`reserve_cores=0`, the behaviour "
               f"before one core was kept for the RunEngine) costs "
               f"{slow['process-allcores']:.1f} %" if "process-allcores" in slow else "")
            + ". The scan without the callback took "
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
            "reconstruction also holds the RunEngine's interpreter lock"
            + (f"; on both cores {slow['process-allcores']:.1f} %"
               if "process-allcores" in slow else "")
            + "). Below the floor takes "
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


def _fmt(value, digits: int = 2, none: str = "-") -> str:
    return none if value is None else f"{value:.{digits}f}"


def _secs(value) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _runs(values, digits: int = 2, none: str = "not reached") -> str:
    """One value per repeat, ``a / b``."""
    return " / ".join(_fmt(v, digits, none) for v in values)


QUALITY_LABELS = {
    "network": "(a) network alone", "rpie_flat": "(b) rPIE, flat start",
    "rpie_positions": "(b+) rPIE, flat start, position correction",
    "hybrid": "(c) hybrid, one core",
    "hybrid_concurrent": "(c2) hybrid, concurrent (2 cores)",
    "ptychi_lsqml": "(d) pty-chi LSQML", "ptychi_rpie": "(d) pty-chi rPIE",
}
HYBRID_LABELS = {"hybrid": "(c)", "hybrid_concurrent": "(c2)"}


def _weighings(run: dict) -> str:
    done = run.get("reconsiderations") or []
    if not done:
        return "no network image weighed"
    return ", ".join(
        f"weighed at {w['frames']} frames / {w['epochs']:.1f} epochs: {w['chosen']} continued ("
        + ", ".join(f"{k} {v:.3g}" for k, v in w["residuals"].items()) + ")" for w in done)


def _retirement(run: dict) -> str:
    """(c) only: when the network left the core to the refiner, if it did."""
    if "network_retired" not in run:
        return ""
    began = run.get("network_started")
    start = ("" if "network_started" not in run else
             "; the network never started (the refiner's error did not settle)" if began is None
             else f"; the network started at {began['t']:.2f} s, when the refiner's error had "
             f"settled ({began['passes']} passes)")
    gone = run["network_retired"]
    if gone is None:
        if began is None and "network_started" in run:
            return start
        return start + f"; the network went through {run.get('network_frames', '?')} frames"
    return start + (f"; the network retired after {gone['frames']} frames at {gone['t']:.2f} s "
            f"(refined residual {gone['refined_residual']:.3g}, network "
            f"{gone['network_residual']:.3g} on those frames)")


def quality_section() -> str:
    q = json.loads((ROOT / "bench/results/quality.json").read_text())
    metric, level = q["metric"], q["target_auc"]
    load = q.get("load_average_before") or []
    load_after = q.get("load_average_after") or []
    check = q.get("thread_check") or {}
    lines = [
        QUALITY_MARKER, "## Time to quality (`bench/quality.py`)", "",
        f"Machine: {q['machine']}; {q['threads']} torch thread(s) per engine, one method at a "
        "time: (a), (b), (c) and pty-chi on 1 core, (c2) on 2 (network and refiner in a thread "
        f"each, as the live engine runs them); {q['repeats']} repeat(s) of (a)-(c2) per scan in "
        "rotated order"
        f"{', pty-chi between the first two' if q['repeats'] > 1 else ''}; measured "
        f"{q['date']} (`.venv/bin/python {q['command']}`, {q['wall_s'] / 60:.1f} min in all).",
        "",
    ]
    if load:
        lines += [
            f"The machine was shared while this ran (1-minute load average {load[0]:.1f} before, "
            f"{load_after[0] if load_after else float('nan'):.1f} after, on 2 cores), so every "
            "time below is stretched by the other users' load, differently from one method to "
            "the next; the repeats show by how much."
            + (f" One torch thread per engine because 2-thread torch regions stall when the "
               f"other core is taken: in this run 3 rPIE passes over scan A took "
               f"{check['threads_1_s']:.2f} s on 1 thread and {check['threads_2_s']:.2f} s on "
               "2. The same contention weighs on (c2), whose two threads want both cores."
               if check else ""), "",
        ]
    lines += [
        "FRC-AUC (0-0.5 of Nyquist) of the **complex** object against the truth (global phase "
        "and phase plane removed, sub-pixel registration, 8-px Tukey taper, inside the scanned "
        "box; `compare_objects` scores amplitude and phase, the complex FRC is computed on the "
        "aligned complex arrays it returns; phase and amplitude scores are in the JSON) against "
        "wall time from *all frames in memory* (what pty-chi needs). Only computation is timed, "
        "never scoring. A curve holds a method's latest image until its next one; before its "
        "first image a method shows nothing (FRC-AUC 0 in the margins).", "",
        "Scans (simulated, known truth):", "",
    ]
    for scan in q["scans"]:
        info = scan["info"]
        lines.append(f"- **{scan['label']}**: sample {info['sample']}, probe {info['probe']}, "
                     f"frames {info['frame_px']} px, step {info['step_px']:.1f} px, object "
                     f"{info['object_px']} px" + (
                         f", background {info['background_counts_per_px']} counts/px"
                         if info.get("background_counts_per_px") else "") + ".")
    lines += [
        "", "Methods, on the same frames, positions and probe start: (a) the shipped `default` "
        "network through `StreamingReconstructor` (one image, when the scan has been through "
        "it); (b) `StreamingRefiner(start=\"flat\")`, rPIE batch 16, probe refined only where "
        "unknown (the step shrinks once the fit error settles, `PIEOptions.anneal`, the "
        "default; while the probe is being learnt, momentum across passes, "
        "`PIEOptions.momentum=\"auto\"`, the default since 2026-12-03, docs/momentum.md), an "
        "image recorded after every slice of at most 0.1 s; (b+) the same with "
        "`position_correction=True` (opt-in: each frame's probe "
        "centre refined from its own update from pass 2 on); (c) the hybrid on **one core**: "
        "the same refiner with `start=\"auto\"` starts flat at t = 0; once its fit error has "
        "settled (a pass lowers it by < 0.3 %, `StepSchedule`: until then the core buys the "
        "refined image more than a network image could), after each of its slices the network "
        "takes a chunk of frames (32, then 128) until the scan has been through it or the "
        "network retires (the refined object explains the frames the network "
        "has been through better than the network's image: both Fourier residuals on those "
        "frames, no truth; the core is then the refiner's); the first network image is "
        "weighed against the refined "
        "state as it stands (one trial pass each of continuing, the network and its high-pass "
        "on copies, over a fixed 256-frame sample with the run's updates, probe included; a "
        "restart from a network candidate only where it has the lower Fourier residual); at "
        "each time point it shows whichever of network and refined image has the lower "
        "Fourier-magnitude residual (the live engine's `best`, chosen again at most every 0.5 s; "
        "those evaluations count in its time): the **equal-cores** comparison, which pays for "
        "the network out of the "
        "refiner's core; (c2) the hybrid as the live engine runs it, on **2 cores**: a "
        "`RefinerThread` (duty 1, start auto, all frames at t = 0, snapshots with both "
        "residuals every 0.25 s) beside the network in the main thread, which goes through the "
        "frames in chunks of 128, offers each stitched image (the first weighed as in (c)) and "
        "shows it; shown, sampled every 0.1 s: `RefinerThread.latest` where its `best` is "
        "refined, else the latest network image; (d) pty-chi 2.2.0 LSQML "
        "(batch 64) and rPIE (batch 16) epoch by epoch in `.venv-bench`, task set-up counted.",
        "", "![FRC-AUC vs wall time](figures/quality.png)", "",
        f"Per method ({'one value per repeat, ' if q['repeats'] > 1 else ''}pty-chi once): "
        "time of the first and last image shown, "
        f"epochs at the last, FRC-AUC complex (phase) of the last image and the best complex "
        f"reached, seconds to complex FRC-AUC {level}.", "",
        "| scan | method | first image (s) | last image (s) | epochs | FRC-AUC last, complex "
        f"(phase) | best | to {level} (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scan in q["scans"]:
        for key, label in QUALITY_LABELS.items():
            method = scan["methods"].get(key, {})
            runs = method.get("runs")
            if not runs:
                why = method.get("skipped") or (method.get("error") or "")[-120:]
                lines.append(f"| {scan['name']} | {label} | not run: {why} | | | | | |")
                continue
            first = [r["points"][0]["t"] for r in runs]
            last = [r["points"][-1]["t"] for r in runs]
            epochs = [r["points"][-1].get("epochs") for r in runs]
            final = " / ".join(f"{r['points'][-1][metric]:.3f} "
                               f"({r['points'][-1]['frc_auc_0.5_phase']:.3f})" for r in runs)
            best = [max(p[metric] for p in r["points"]) for r in runs]
            start = (f" (start: {', '.join(str(r['start']) for r in runs)})"
                     if key in HYBRID_LABELS else "")
            lines.append(
                f"| {scan['name']} | {label}{start} | {_runs(first)} | {_runs(last)} | "
                f"{_runs(epochs, 1, '-')} | {final} | {_runs(best, 3)} | "
                f"{_runs(scan['time_to_target_s'].get(key, []))} |")
    lines += ["", "What each hybrid did with the network's image (per repeat): when it was "
              "shown first, when the first refined image was shown, and each weighing of a "
              "network image against the refined state (frames, epochs, residuals after the "
              "trial pass, what was continued):", ""]
    for scan in q["scans"]:
        for hyb, tag in HYBRID_LABELS.items():
            runs = scan["methods"].get(hyb, {}).get("runs") or []
            parts = []
            for k, run in enumerate(runs):
                pts = run["points"]
                net = next((p["t"] for p in pts if p.get("shown") == "network"), None)
                refined = next((p["t"] for p in pts if p.get("shown") == "refined"), None)
                parts.append((f"repeat {k + 1}: " if len(runs) > 1 else "")
                             + f"network shown from {_secs(net)}, refined from "
                             f"{_secs(refined)}, " + _weighings(run) + _retirement(run))
            if parts:
                lines.append(f"- {scan['name']} {tag}: " + "; ".join(parts) + ".")
    targets = q["targets"]
    lines += ["", "### Targets", ""]
    for hyb, tag in HYBRID_LABELS.items():
        suffix = "" if hyb == "hybrid" else "_concurrent"
        if f"hybrid{suffix}_at_or_above_network_and_rpie" not in targets:
            continue
        ok = targets[f"hybrid{suffix}_at_or_above_network_and_rpie"]
        lines.append(
            f"- The hybrid {tag}'s curve at or above (a) and (b) at every time point"
            f"{' (equal cores)' if hyb == 'hybrid' else ' (2 cores against their 1)'}: "
            f"**{'met' if ok else 'not met'}** (worst margin "
            f"{targets[f'hybrid{suffix}_worst_margin']:+.3f}). Per scan, worst ({tag} - other) "
            "over the repeats, where, and for how long it was behind:")
        for scan in q["scans"]:
            parts = []
            for other, label in (("network", "(a)"), ("rpie_flat", "(b)")):
                worst = min(scan[f"hybrid{suffix}_margins"],
                            key=lambda c, o=other: c[o]["worst_margin"])
                c = worst[other]
                parts.append(
                    f"vs {label} {c['worst_margin']:+.3f} at {c['at_s']:.2f} s (from {tag}'s "
                    f"first image on: {_fmt(c['worst_margin_from_first_hybrid_image'], 3)}), "
                    f"behind for {c['seconds_behind']:.1f} of {c['compared_up_to_s']:.1f} s")
            floor = scan.get("rpie_flat_repeat_margin")
            if floor is not None:
                parts.append(f"(b) against its own other repeat {floor:+.3f}")
            lines.append(f"  - {scan['name']}: " + "; ".join(parts) + ".")
        within = targets.get(f"hybrid{suffix}_within_repeat_noise")
        if within is not None and targets.get("rpie_flat_repeat_margin") is not None:
            lines.append(
                f"  - The measure's resolution: (b) run twice, same code and seed, is "
                f"{targets['rpie_flat_repeat_margin']:+.3f} behind itself at worst (its slices "
                "end at slightly different times, and on a steep part of the curve two images "
                "0.02 s apart differ by that much). Within it, and never behind (a): "
                f"**{'yes' if within else 'no'}** (" + ", ".join(
                    scan["name"] + (" yes" if scan.get(f"hybrid{suffix}_within_repeat_noise")
                                    else " no") for scan in q["scans"]) + ").")
    ok = targets["speedup_vs_lsqml_ge_20"]
    verdict = "met" if ok else "not met"
    lines.append(f"- Time to FRC-AUC {level} (complex) at least 20x shorter for the hybrid (c) "
                 f"than for pty-chi LSQML on the same data and cores: **{verdict}** (the "
                 "hybrid's slower repeat counts; (c2)'s ratio, on twice the cores, in "
                 "brackets):")
    for scan in q["scans"]:
        r = scan["speedup_vs_lsqml"]
        hyb, lsq = r["hybrid_s_worst_repeat"], r["lsqml_s"]
        lsqml = scan["methods"].get("ptychi_lsqml", {})
        if not lsqml.get("runs"):
            why = lsqml.get("skipped") or "failed, see quality.json"
            text = (f"hybrid {_fmt(hyb, 2, 'not reached')}{' s' if hyb else ''}; LSQML not "
                    f"run ({why})")
        elif hyb and lsq:
            text = f"hybrid {hyb:.2f} s, LSQML {lsq:.2f} s: **{r['ratio']:.1f}x**"
        elif hyb and r.get("ratio_at_least"):
            text = (f"hybrid {hyb:.2f} s, LSQML not within its {r['lsqml_ran_s']:.0f} s: "
                    f"**>= {r['ratio_at_least']:.1f}x**")
        elif lsq:
            text = f"LSQML {lsq:.2f} s, the hybrid did not reach {level} within its budget"
        else:
            text = f"neither the hybrid nor LSQML reached {level} within its budget"
        if r.get("rpie_flat_ratio"):
            text += f" ((b) rPIE flat: {r['rpie_flat_ratio']:.1f}x)"
        c2 = scan.get("speedup_concurrent_vs_lsqml")
        if c2 and c2.get("hybrid_s_worst_repeat"):
            c2_ratio = (f"{c2['ratio']:.1f}x" if c2.get("ratio") else
                        f">= {c2['ratio_at_least']:.1f}x" if c2.get("ratio_at_least") else "-")
            text += f" [(c2) {c2['hybrid_s_worst_repeat']:.2f} s: {c2_ratio}]"
        elif c2:
            text += f" [(c2) did not reach {level}]"
        lines.append(f"  - {scan['name']}: {text}.")
    live = q["live_latency"]
    ok = targets["final_image_within_5s"]
    scores = live.get("final_scores") or {}
    lines.append(
        f"- Final refined image within 5 s of the last frame of the {live['frames']}-frame scan "
        f"A: **{'met' if ok else 'not met'}**: {live['final_refined_after_last_frame_s']:.2f} s "
        f"(frames at {live['rate_frames_per_s']:.0f} frames/s in pages of {live['page']}, "
        f"through the live worker's steps: network batches of {live.get('batch', 64)}, each "
        "then handed to a `RefinerThread` (duty 0.5, start auto: flat at once, network images "
        "weighed as in (c)), the network image offered "
        "after every batch until the refiner has started and every "
        f"{live.get('snapshot_every', 128)} frames; two threads of one torch thread each; then "
        f"`finish(time_s={live['finish_time_s']:g}, tol=1e-3)`; the network's "
        f"final image {live['network_final_after_last_frame_s']:.2f} s after the last frame). "
        f"The final image: {_fmt(live.get('final_epochs'), 1)} epochs, start "
        f"{live.get('start')}, FRC-AUC {_fmt(scores.get(metric), 3)} (network "
        f"{_fmt((live.get('network_scores') or {}).get(metric), 3)}); the refiner had "
        f"started by the time {live.get('refiner_started_after_frames')} frames had arrived, "
        f"and {live.get('seeds_offered')} network images were offered during the scan.")
    lines += [QUALITY_MARKER]
    return "\n".join(lines)


def _put(text: str, marker: str, block: str) -> str:
    """Replace the block between two ``marker`` lines, or append it."""
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        return head + block + tail
    return text.rstrip() + "\n\n" + block + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality-only", action="store_true",
                        help="rewrite only the time-to-quality section")
    args = parser.parse_args(argv)
    path = ROOT / "docs" / "performance.md"
    text = path.read_text()
    if not args.quality_only:
        text = _put(text, MARKER, section())
    if (ROOT / "bench/results/quality.json").exists():
        text = _put(text, QUALITY_MARKER, quality_section())
    path.write_text(text)


if __name__ == "__main__":
    main()
