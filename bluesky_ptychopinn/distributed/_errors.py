"""Errors of the distributed (message bus) layer, and how asynchronous bus errors are logged."""

from __future__ import annotations

import logging

from ..errors import PtychoError

__all__ = ["BusErrorLog", "BusUnavailableError"]


class BusUnavailableError(PtychoError, ConnectionError):
    """The message bus (nats-server) cannot be started or reached."""


#: Words of a NATS error that a retry does not cure: wrong or missing credentials, or a
#: permission the account lacks.
_AUTH_WORDS = ("authoriz", "authenticat", "permissions violation")


class BusErrorLog:
    """``error_cb`` for ``nats.connect`` (pass :meth:`handle`): each distinct error is logged
    once at WARNING (ERROR for authorisation and permission errors, which no reconnect cures),
    its repeats at DEBUG. nats-py reports every failed reconnect attempt; one line per cause
    is enough, but the cause must be visible (a wrong password otherwise looks like an
    outage).

    Parameters
    ----------
    logger : logging.Logger
        Where the lines go.
    what : str
        Names the connection in the lines (``"bus nats://..."``, a worker's name).
    max_kinds : int
        Distinct messages remembered; beyond it the oldest is forgotten (logged again).
    """

    def __init__(self, logger: logging.Logger, what: str, max_kinds: int = 64) -> None:
        self.logger = logger
        self.what = what
        self.max_kinds = int(max_kinds)
        self._seen: dict[str, None] = {}

    @staticmethod
    def is_auth(text: str) -> bool:
        """Whether an error text says the credentials or permissions are wrong."""
        lower = text.lower()
        return any(word in lower for word in _AUTH_WORDS)

    async def handle(self, exc: BaseException) -> None:
        """Log ``exc`` (a coroutine function, as nats-py requires)."""
        text = str(exc) or type(exc).__name__
        if text in self._seen:
            self.logger.debug("%s: %s", self.what, text)
            return
        self._seen[text] = None
        while len(self._seen) > self.max_kinds:
            del self._seen[next(iter(self._seen))]
        if self.is_auth(text):
            self.logger.error("%s: %s (check the credentials: connect_options / --bus-creds)",
                              self.what, text)
        else:
            self.logger.warning("%s: %s", self.what, text)
