"""Logging set-up with the client id and round in every record's context.

The ids live in context variables: each asyncio task (one per connection) gets its own copy, so a
line logged anywhere below a connection handler names its client without passing loggers around.
"""

from __future__ import annotations

import contextvars
import logging
import sys

client_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("fedquic_client", default="-")
round_var: contextvars.ContextVar[int] = contextvars.ContextVar("fedquic_round", default=0)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.client = client_id_var.get()
        record.round = round_var.get()
        return True


FORMAT = "%(asctime)s %(levelname)-7s %(name)s [client=%(client)s round=%(round)s] %(message)s"


def setup_logging(level: str = "INFO", *, stream: object = None, filename: str | None = None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(filename) if filename else logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    )
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aioquic logs every handshake at INFO; keep it for debugging only.
    logging.getLogger("quic").setLevel(max(logging.WARNING, root.level))
