"""Names on the bus: one document stream and one run work queue per beamline.

Subjects follow bluesky-nats' ``events.<...>`` prefix (without depending on that package):

- ``events.<beamline>.<run uid>.<document name>``: every document of a run, in the stream
  ``BLUESKY_<BEAMLINE>`` (limits retention: any number of readers, replayable from a run's
  first document; the default keeps a week);
- ``ptycho.<beamline>.runs``: one announcement per run (at its start document), in the work-queue
  stream ``PTYCHO_RUNS_<BEAMLINE>``; the durable pull consumer ``ptychopinn-workers`` hands each
  announcement to one worker, and again to another one if the first does not acknowledge it
  within the ack deadline. An announcement delivered ``max_deliver`` times without being
  acknowledged is not delivered again; the server then publishes an advisory on
  :func:`max_deliveries_subject` (core NATS, to whoever listens at that moment).
"""

from __future__ import annotations

import re

__all__ = ["beamline_token", "docs_stream", "docs_subject", "max_deliveries_subject",
           "run_filter", "runs_stream", "runs_subject", "WORKERS_DURABLE"]

#: Durable consumer name shared by all reconstruction workers of a beamline.
WORKERS_DURABLE = "ptychopinn-workers"


def beamline_token(beamline: str) -> str:
    """``beamline`` as one subject token: letters, digits, ``-`` and ``_`` only."""
    token = re.sub(r"[^A-Za-z0-9_-]", "_", beamline.strip())
    if not token:
        raise ValueError(f"beamline: a non-empty name expected, got {beamline!r}")
    return token


def docs_stream(beamline: str) -> str:
    return f"BLUESKY_{beamline_token(beamline).upper()}"


def runs_stream(beamline: str) -> str:
    return f"PTYCHO_RUNS_{beamline_token(beamline).upper()}"


def docs_subject(beamline: str, run_uid: str, name: str) -> str:
    return f"events.{beamline_token(beamline)}.{beamline_token(run_uid)}.{name}"


def run_filter(beamline: str, run_uid: str) -> str:
    """Every document subject of one run."""
    return f"events.{beamline_token(beamline)}.{beamline_token(run_uid)}.>"


def runs_subject(beamline: str) -> str:
    return f"ptycho.{beamline_token(beamline)}.runs"


def max_deliveries_subject(beamline: str) -> str:
    """JetStream's advisory for an announcement the workers' consumer gave up redelivering."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{runs_stream(beamline)}.{WORKERS_DURABLE}"
