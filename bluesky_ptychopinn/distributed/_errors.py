"""Errors of the distributed (message bus) layer."""

from __future__ import annotations

from ..errors import PtychoError

__all__ = ["BusUnavailableError"]


class BusUnavailableError(PtychoError, ConnectionError):
    """The message bus (nats-server) cannot be started or reached."""
