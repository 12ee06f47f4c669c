"""Inference throughput of the shipped default model (frames/s, 64x64) through the streaming
engine, the path every live frame takes, plus the bare network for reference.

    .venv/bin/python bench/inference.py [--threads 2] [--batch 256] [--frames 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bluesky_ptychopinn import physics  # noqa: E402
from bluesky_ptychopinn.models import ModelRegistry  # noqa: E402
from bluesky_ptychopinn.recon import StreamingReconstructor  # noqa: E402
from bluesky_ptychopinn.synthetic import make_object  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from core import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--frames", type=int, default=4096)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (bf16 autocast, channels_last)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, card = ModelRegistry().load(args.model)
    n = model.config.frame_size
    obj = make_object("cells", (512, 512), seed=0)
    probe = physics.make_probe("zone_plate", n, 44e-9, 8_800)
    pos = physics.fermat_spiral_scan((400.0, 400.0), 400 / np.sqrt(args.frames)) + 256
    pos = pos[: args.frames]
    frames = physics.simulate_diffraction(obj, probe, pos, photons=1e6, seed=0).counts

    # Bare network (groups of C frames in, patches out).
    c = model.config.channels
    usable = min(args.batch, len(frames) // c) * c  # whole groups of C frames
    batch = frames[:usable].reshape(-1, c, n, n).to(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def network_groups_per_s(memory_format) -> float:
        net = model.to(device).to(memory_format=memory_format)
        x = batch.contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            net.forward_parts(x, 0.1)
            sync()
            t = time.perf_counter()
            repeats = 20 if cuda else 5
            for _ in range(repeats):
                net.forward_parts(x, 0.1)
            sync()
            return repeats * x.shape[0] / (time.perf_counter() - t)

    # side by side: the layout the streaming engine uses (channels_last) and torch's default
    net_fps_contiguous = network_groups_per_s(torch.contiguous_format)
    net_fps = network_groups_per_s(torch.channels_last)

    # Streaming engine: network + grouping + stitching, every frame anchoring one group.
    def stream():
        recon = StreamingReconstructor(model, object_shape=(512, 512), batch_size=args.batch,
                                       device=device)
        start = time.perf_counter()
        for lo in range(0, len(pos), args.batch):
            recon.add(frames[lo : lo + args.batch], pos[lo : lo + args.batch])
        recon.finish()
        sync()
        return len(pos) / (time.perf_counter() - start), recon.stats()

    stream()  # warm-up
    fps, stats = max((stream() for _ in range(2)), key=lambda r: r[0])
    result = {
        "machine": machine(), "threads": args.threads, "device": str(device), "batch": args.batch,
        "frames": len(pos), "model": args.model, "channels": c,
        "parameters": card.get("n_parameters"),
        "network_groups_per_s": net_fps,
        "network_groups_per_s_contiguous": net_fps_contiguous,
        "streaming_frames_per_s": fps,
        "batch_latency_p50_s": stats["batch_latency_p50_s"],
        "date": time.strftime("%Y-%m-%d"),
    }
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = "inference_cuda.json" if cuda else "inference.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
