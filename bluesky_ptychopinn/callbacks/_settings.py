"""The knobs of the live reconstruction that travel to wherever it runs (picklable)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass

__all__ = ["DERIVED_UID_MODES", "RECONSTRUCTION_PLAN_NAME", "REFINE_ENGINES", "WorkerSettings",
           "derived_run_uid"]

RECONSTRUCTION_PLAN_NAME = "ptychopinn_reconstruction"

#: Refinement engines of :class:`LiveReconstruction` (``refine=``); ``None`` turns it off.
REFINE_ENGINES = ("rpie", "epie")

DERIVED_UID_MODES = ("random", "deterministic")
_DERIVED_NAMESPACE = uuid.UUID("5b0f3c1e-8f4d-4c39-9d0e-7d2f3a6b1c44")


@dataclass(frozen=True)
class WorkerSettings:
    """What :class:`~bluesky_ptychopinn.callbacks.LiveReconstruction` passes to a worker."""

    batch_size: int = 64
    snapshot_every: int = 128
    device: str | None = None
    canvas_margin_px: int = 8
    flush_after_s: float = 0.2
    publish_interval_s: float = 0.5
    refine: str | None = "rpie"
    refine_budget_s: float = 5.0
    refine_epochs: float | None = None
    refine_tol: float | None = 1e-3
    refine_duty: float = 0.5
    refine_batch_size: int = 16
    refine_positions: bool = False  # position correction in the refiner
    crop: int | str = "auto"
    derived_uid: str = "random"
    data_roots: tuple[str, ...] = ()  # added to the default data roots (callbacks/_paths.py)
    max_canvas_px: int = 8192  # canvas side the network and refiner may grow to, at most
    read_timeout_s: float = 30.0  # a detector file's read unanswered this long: given up


def derived_run_uid(raw_uid: str, model_info: dict, settings: WorkerSettings) -> str | None:
    """The derived run's uid: ``None`` (a fresh random one) unless
    ``settings.derived_uid == "deterministic"``; then a UUID5 of the raw run's uid, the model's
    sha256 and the reconstruction settings, so that a run reconstructed twice (a remote worker
    redelivered a run) produces the same derived uid and cannot appear twice in a catalog."""
    if settings.derived_uid != "deterministic":
        return None
    knobs = {k: v for k, v in dataclasses.asdict(settings).items() if k != "derived_uid"}
    key = json.dumps({"raw": raw_uid, "model": model_info.get("sha256"), "settings": knobs},
                     sort_keys=True, default=str)
    return str(uuid.uuid5(_DERIVED_NAMESPACE, key))
