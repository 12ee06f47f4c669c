"""Remote reconstruction workers over NATS JetStream (default) or Kafka.

Beamline side: :func:`publish_documents` sends every RunEngine document to the bus. Worker side:
:class:`Worker` (``bluesky-ptychopinn worker``) takes whole runs from the beamline's work queue,
reconstructs them and writes derived runs to Tiled. :class:`NatsServer`
(``bluesky-ptychopinn bus serve``) is a local nats-server for one host, tests and benchmarks.
A ``kafka://BROKERS`` bus URL selects the Kafka transport instead (:mod:`._kafka`; the
``kafka`` extra, confluent-kafka, imported only then). docs/deployment.md describes a
facility's set-up.
"""

from ._errors import BusUnavailableError
from ._frames import PathMap, TiledFrames, parse_path_map
from ._guard import DerivedOutcome, DerivedRunGuard
from ._kafka import KafkaPublisher, KafkaWorker, kafka_group, kafka_topic, probe_kafka
from ._publisher import DocumentPublisher, PublisherStats, publish_documents
from ._server import NatsServer, default_bus_dir, find_nats_server, free_port, probe_bus
from ._subjects import docs_stream, docs_subject, run_filter, runs_stream, runs_subject
from ._worker import RunWorker, Worker, WorkerOptions, make_worker, run_worker

__all__ = [
    "BusUnavailableError",
    "DerivedOutcome",
    "DerivedRunGuard",
    "DocumentPublisher",
    "KafkaPublisher",
    "KafkaWorker",
    "NatsServer",
    "PathMap",
    "PublisherStats",
    "RunWorker",
    "TiledFrames",
    "Worker",
    "WorkerOptions",
    "default_bus_dir",
    "docs_stream",
    "docs_subject",
    "find_nats_server",
    "free_port",
    "kafka_group",
    "kafka_topic",
    "make_worker",
    "parse_path_map",
    "probe_bus",
    "probe_kafka",
    "publish_documents",
    "run_filter",
    "run_worker",
    "runs_stream",
    "runs_subject",
]
