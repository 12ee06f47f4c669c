"""The one reconstruction loop every transport runs: raw documents in, messages out.

``serve(inbox, send, ...)`` takes items from ``inbox`` (a :class:`queue.Queue`, a
:class:`multiprocessing.Queue`, a bus subscription adapted to ``get(timeout=)``) and keeps one
:class:`~._reconstruction.RunReconstruction` per raw run uid:

- ``("open", raw_uid, md[, model_path, model_info])``: a new run, with its validated
  :class:`~..metadata.PtychoMetadata` and, where the run has its own model
  (``model="auto"``), that model's directory and description (loaded once per version of
  the model, then kept; a network whose hashes differ from the description fails the run);
- ``("doc", raw_uid, name, doc)``: one of its raw documents (the start document included);
- ``("shutdown",)``: return, abandoning the runs still open (the RunEngine side fails them).

Everything it learns goes out through ``send(kind, raw_uid, payload)``. An error in one run
fails that run only (``failed``, then ``finished`` with ``"fail"`` at its stop); with
``BLUESKY_DEBUG_CALLBACKS=1`` it is raised instead, as bluesky's own safe callbacks do.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable

import torch

from ._reconstruction import RunReconstruction, Send
from ._settings import WorkerSettings

__all__ = ["serve"]

logger = logging.getLogger(__name__)


def _debugging() -> bool:
    return bool(os.environ.get("BLUESKY_DEBUG_CALLBACKS"))


def _safely(run: RunReconstruction, name: str, doc: dict) -> None:
    """``run(name, doc)``; an exception fails the run (and is raised when debugging)."""
    try:
        run(name, doc)
        return
    except Exception as exc:
        logger.exception("run %s: error handling its %s document", run.raw_uid, name)
        if _debugging():
            raise
        run.fail(f"{type(exc).__name__} while handling {name}: {exc}")
    if name == "stop":  # stop() itself failed: the run must still end
        run.force_finish()


def _idle(run: RunReconstruction) -> None:
    try:
        run.idle()
    except Exception as exc:
        logger.exception("run %s: error while flushing", run.raw_uid)
        if _debugging():
            raise
        run.fail(f"{type(exc).__name__} while flushing: {exc}")
        if run.stop_doc is not None:  # finishing a deferred stop failed: end it, once
            run.force_finish()


def _finish_deferred(runs: dict[str, RunReconstruction], flush: float) -> None:
    """At shutdown: runs whose stop came while their last frames were still being read are
    finished first (each within its read timeout), as a stop handled at once would be."""
    while any(r.stop_doc is not None and not r.finished for r in runs.values()):
        time.sleep(flush)
        for run in runs.values():
            if run.stop_doc is not None and not run.finished:
                _idle(run)


def _model(models: dict, path: str, info: dict) -> torch.nn.Module:
    """The network saved in ``path``, loaded (and verified) the first time a run needs it.

    ``info`` is the model as the RunEngine's side verified and described it when it chose it
    for the run; the network loaded must have the same hashes, so the derived run never names
    one model while another reconstructs it (a model saved again in the same directory).
    """
    key = (path, info.get("sha256"))
    if key not in models:
        from ..errors import CheckpointError
        from ..models import load_verified_model

        network, _, identity = load_verified_model(path, device="cpu")
        if identity.sha256 != info.get("sha256"):
            raise CheckpointError(
                f"{path}: the model changed on disk since it was chosen for this run (sha256 "
                f"{identity.sha256[:16]}..., chosen {str(info.get('sha256'))[:16]}...)")
        for older in [k for k in models if k[0] == path]:
            del models[older]  # one network per directory: a retrained model replaces it
        models[key] = network
        logger.info("model %s loaded for the runs that reference its probe", path)
    return models[key]


def _open_run(item: tuple, models: dict, send: Send, model: torch.nn.Module,
              model_info: dict, settings: WorkerSettings) -> RunReconstruction | None:
    """A run's reconstruction, or ``None`` after failing its derived run: an error here (the
    run's model unreadable, its metadata refused) ends that run alone, never the loop that
    serves every later run."""
    uid, md = item[1], item[2]
    try:
        run_model, run_info = model, model_info
        if len(item) > 3 and item[3] is not None:
            run_model, run_info = _model(models, item[3], item[4]), item[4]
        return RunReconstruction(run_model, run_info, settings, md, uid, send)
    except Exception as exc:
        logger.exception("live reconstruction: run %s could not be opened", uid)
        reason = f"the reconstruction could not start: {type(exc).__name__}: {exc}"
        send("failed", uid, {"reason": reason})
        send("finished", uid, {"exit_status": "fail", "reason": reason,
                               "summary": {"frames_done": 0, "frames_rejected": 0}})
        return None


def serve(inbox, send: Send, model: torch.nn.Module, model_info: dict,
          settings: WorkerSettings, *, alive: Callable[[], bool] = lambda: True) -> None:
    """Reconstruct every run whose documents arrive in ``inbox`` until ``("shutdown",)``.

    Parameters
    ----------
    inbox
        Anything with ``get(timeout=...)`` raising :class:`queue.Empty`.
    send : callable
        ``send(kind, raw_uid, payload)``: the messages of :mod:`._reconstruction`.
    model, model_info, settings
        The network, its derived-run description and the reconstruction settings.
    alive : callable
        Checked when nothing arrives; ``False`` ends the loop (the RunEngine side is gone).
    """
    runs: dict[str, RunReconstruction] = {}
    next_idle: dict[str, float] = {}
    models: dict[tuple, torch.nn.Module] = {}  # (directory, sha256) -> network, model="auto"
    flush = settings.flush_after_s
    try:
        while True:
            try:
                item = inbox.get(timeout=flush if runs else 2.0)
            except queue.Empty:
                item = None
            if item is None:
                if not alive():
                    return
            elif item[0] == "shutdown":
                _finish_deferred(runs, flush)
                return
            elif item[0] == "open":
                uid = item[1]
                run = _open_run(item, models, send, model, model_info, settings)
                if run is not None:
                    runs[uid] = run
                    next_idle[uid] = time.monotonic() + flush
            else:
                _, uid, name, doc = item
                run = runs.get(uid)
                # (after its stop, a run still reading its last frames takes no documents)
                if run is not None and run.stop_doc is None:
                    _safely(run, name, doc)
                    next_idle[uid] = time.monotonic() + flush
            now = time.monotonic()
            for uid, run in list(runs.items()):
                if not run.finished and now >= next_idle[uid]:
                    _idle(run)
                    next_idle[uid] = now + flush
                if run.finished:
                    del runs[uid], next_idle[uid]
    finally:
        for run in runs.values():
            run.close()
