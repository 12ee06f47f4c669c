"""Remote reconstruction workers over NATS JetStream.

Beamline side: :func:`publish_documents` sends every RunEngine document to the bus. Worker side:
:class:`Worker` (``bluesky-ptychopinn worker``) takes whole runs from the beamline's work queue,
reconstructs them and writes derived runs to Tiled. :class:`NatsServer`
(``bluesky-ptychopinn bus serve``) is a local nats-server for one host, tests and benchmarks.
docs/deployment.md describes a facility's set-up.
"""

from ._errors import BusUnavailableError
from ._frames import PathMap, TiledFrames, parse_path_map
from ._guard import DerivedOutcome, DerivedRunGuard
from ._publisher import DocumentPublisher, PublisherStats, publish_documents
from ._server import NatsServer, default_bus_dir, find_nats_server, free_port, probe_bus
from ._subjects import docs_stream, docs_subject, run_filter, runs_stream, runs_subject
from ._worker import Worker, WorkerOptions, run_worker

__all__ = [
    "BusUnavailableError",
    "DerivedOutcome",
    "DerivedRunGuard",
    "DocumentPublisher",
    "NatsServer",
    "PathMap",
    "PublisherStats",
    "TiledFrames",
    "Worker",
    "WorkerOptions",
    "default_bus_dir",
    "docs_stream",
    "docs_subject",
    "find_nats_server",
    "free_port",
    "parse_path_map",
    "probe_bus",
    "publish_documents",
    "run_filter",
    "run_worker",
    "runs_stream",
    "runs_subject",
]
