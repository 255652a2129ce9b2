"""offload's kombu transports.

* :mod:`offload.transport.sqlite`: the embedded broker, ``sqlite:///path/to/broker.sqlite``.
  kombu only resolves URL schemes through its alias table (it refuses dotted module paths that
  come from a URL), so :func:`register` must run before a ``sqlite://`` URL is used.
* :mod:`offload.transport.redis`: kombu's Redis transport plus visibility extension, selected
  with Celery's ``broker_transport="offload.transport.redis:Transport"``.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

SQLITE_SCHEME = "sqlite"
SQLITE_TRANSPORT = "offload.transport.sqlite:Transport"
REDIS_TRANSPORT = "offload.transport.redis:Transport"

__all__ = ["REDIS_TRANSPORT", "SQLITE_SCHEME", "SQLITE_TRANSPORT", "register"]


def register() -> None:
    """Make kombu (and so Celery) accept ``sqlite://`` broker URLs.

    Idempotent and cheap: it only adds an alias; the transport module is imported by kombu when a
    connection first needs it.
    """
    TRANSPORT_ALIASES[SQLITE_SCHEME] = SQLITE_TRANSPORT
