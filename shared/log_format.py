"""How every tokenrelay process writes its log: one format, set up once per process (the
command's own, and each process uvicorn starts for ``gateway --workers N``)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str) -> None:
    """Log at ``level`` (a name: ``info``, ``debug``, ...) to standard error, in :data:`FORMAT`."""
    logging.basicConfig(level=level.upper(), format=FORMAT)
