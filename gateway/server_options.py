"""How a gateway process asks uvicorn to serve it (one process or several, or the dev mode)."""

from __future__ import annotations

import logging
import math
from typing import Any

from gateway.protocol import GatewayProtocol
from shared.settings import Settings


def uvicorn_options(settings: Settings, host: str, port: int) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``."""
    return {
        "host": host,
        "port": port,
        "log_level": settings.log_level,
        # uvicorn builds each request's access-log arguments (client address, quoted path)
        # before the logger drops the record: a reconnect storm paid for lines nobody saw.
        "access_log": logging.getLevelName(settings.log_level.upper()) <= logging.INFO,
        # Resumes this process can answer from memory skip the application (gateway.protocol).
        "http": GatewayProtocol,
        # uvicorn would otherwise wait forever for open event streams on SIGTERM.
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_s),
    }
