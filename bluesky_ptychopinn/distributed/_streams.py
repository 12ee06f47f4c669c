"""Creating a beamline's two JetStream streams and the workers' consumer (idempotent: the
publisher and every worker call it; whoever comes first creates, the others find them)."""

from __future__ import annotations

import logging

from ._subjects import (
    WORKERS_DURABLE,
    beamline_token,
    docs_stream,
    runs_stream,
    runs_subject,
)

__all__ = ["ensure_streams", "ensure_workers_consumer"]

logger = logging.getLogger(__name__)

#: How long a redelivered publish is recognised by its ``Nats-Msg-Id`` (seconds). Long, because
#: a publisher that lost its connection retries what it had not seen acknowledged when the bus
#: is back, which can be many minutes later.
DUPLICATE_WINDOW_S = 3600.0


async def _add_or_keep(js, config) -> None:
    from nats.js.errors import BadRequestError

    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        # 10058: the stream exists with another configuration (an operator tuned it): keep it.
        if getattr(exc, "err_code", None) != 10058:
            raise
        logger.debug("stream %s exists with another configuration; kept", config.name)


async def ensure_streams(js, beamline: str, *, max_age_s: float = 7 * 86400.0,
                         duplicate_window_s: float = DUPLICATE_WINDOW_S) -> None:
    """Create ``BLUESKY_<BL>`` (documents) and ``PTYCHO_RUNS_<BL>`` (work queue) if missing.

    Parameters
    ----------
    js : nats.js.JetStreamContext
    beamline : str
    max_age_s : float
        How long documents stay replayable (file storage).
    duplicate_window_s : float
        Deduplication window of both streams.
    """
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    token = beamline_token(beamline)
    window = min(duplicate_window_s, max_age_s)
    await _add_or_keep(js, StreamConfig(
        name=docs_stream(beamline), subjects=[f"events.{token}.>"],
        retention=RetentionPolicy.LIMITS, storage=StorageType.FILE, max_age=max_age_s,
        duplicate_window=window))
    await _add_or_keep(js, StreamConfig(
        name=runs_stream(beamline), subjects=[runs_subject(beamline)],
        retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE, max_age=max_age_s,
        duplicate_window=window))


async def ensure_workers_consumer(js, beamline: str, *, ack_wait_s: float,
                                  max_deliver: int = 10):
    """The shared durable pull consumer of the run work queue, as a pull subscription.

    ``ack_wait_s`` is the deadline after which an announcement a worker took but neither
    acknowledged nor marked in progress goes to another worker. Workers send in-progress
    heartbeats well inside it, so it bounds the time to notice a dead worker, not the length of
    a run. The first worker creates the consumer; later ones bind to it as it is.
    """
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    config = ConsumerConfig(durable_name=WORKERS_DURABLE, ack_policy=AckPolicy.EXPLICIT,
                            ack_wait=ack_wait_s, max_deliver=max_deliver,
                            deliver_policy=DeliverPolicy.ALL, max_ack_pending=-1)
    return await js.pull_subscribe(runs_subject(beamline), durable=WORKERS_DURABLE,
                                   stream=runs_stream(beamline), config=config)
