"""Replay an archived raw run from Tiled through the live callback, writing a new derived run."""

from __future__ import annotations

import logging
import os

from ..errors import InvalidInputError
from ._server import TiledUnavailableError

__all__ = ["replay_run", "connect"]

logger = logging.getLogger(__name__)


def connect(uri: str | None = None, api_key: str | None = None):
    """A Tiled client for ``uri`` (default ``$TILED_URI``), key from ``api_key`` or
    ``$TILED_API_KEY``. A dead server gives :class:`TiledUnavailableError`."""
    from tiled.client import from_uri

    uri = uri or os.environ.get("TILED_URI")
    if not uri:
        raise InvalidInputError("no Tiled server: pass --tiled URI or set TILED_URI")
    try:
        return from_uri(uri, api_key=api_key or os.environ.get("TILED_API_KEY"))
    except Exception as exc:  # httpx.ConnectError, 401, ... all mean "cannot use this server"
        raise TiledUnavailableError(f"cannot reach Tiled at {uri}: {exc}") from exc


def replay_run(client, uid: str, *, model="default", batch_size: int = 64,
               timeout: float = 600.0, torch_threads: int | None = None,
               refine: str | None = "rpie", refine_budget_s: float = 5.0,
               crop: int | str = "auto", refine_positions: bool = False):
    """Re-stream the raw run ``uid`` through :class:`LiveReconstruction` with ``model``.

    The new derived run (``original_run_uid`` = ``uid``) is written to the same Tiled
    catalog, with the network's snapshots and, unless ``refine=None``, the refined
    (``refine``: rPIE by default) object and probe, refined for up to ``refine_budget_s``
    seconds after the last frame (with position correction if ``refine_positions``), stitched
    with ``crop`` (see :class:`LiveReconstruction`).
    Returns the callback's :class:`RunState` (with ``derived_uid``).
    """
    from bluesky_tiled_plugins import TiledWriter

    from ..callbacks import LiveReconstruction

    try:
        run = client[uid]
    except KeyError as exc:
        raise InvalidInputError(f"run {uid!r} not found in {client.uri}") from exc
    if "original_run_uid" in run.start:
        raise InvalidInputError(f"run {uid} is itself a derived run (of "
                                f"{run.start['original_run_uid']}); replay its raw run")
    # No RunEngine to keep going here, and Tiled hands documents over far faster than they are
    # reconstructed: "block" waits for the reconstruction ("skip" would drop most frames), and
    # a short queue bounds what is read ahead.
    live = LiveReconstruction(model, batch_size=batch_size, torch_threads=torch_threads,
                              refine=refine, refine_budget_s=refine_budget_s, crop=crop,
                              refine_positions=refine_positions, backpressure="block",
                              max_queue=max(4 * batch_size, 256))
    try:
        writer = TiledWriter(client, batch_size=1)  # written as it goes: `watch` shows it live
        live.subscribe(writer)
        for name, doc in run.documents():
            live(name, doc)
        state = live.wait(run.start["uid"], timeout=timeout)
    finally:
        live.close()  # the reconstruction process of this replay ends with it
    logger.info("replayed %s -> derived run %s", uid, state.derived_uid)
    return state
