"""The process's limit on open files, raised to what the system allows.

Every client of an event stream holds a socket for as long as it follows, and a load balancer
or a reconnecting client holds two. Many systems start processes with a soft limit of 1,024
open files (the hard limit is usually far higher), which would cap a gateway at about a
thousand clients, and makes a reconnect storm fail with ``Too many open files``. Like nginx's
``worker_rlimit_nofile`` and Go's runtime, a process that serves (or makes) many connections
raises its soft limit to the hard one at start; children it spawns inherit it.
"""

from __future__ import annotations

import logging
import resource
from typing import NamedTuple

_log = logging.getLogger(__name__)

# Where the hard limit is unlimited (not on Linux, where fs.nr_open bounds it): a limit far
# above any number of connections one process serves.
_UNLIMITED_TARGET = 1_048_576


class OpenFiles(NamedTuple):
    before: int
    after: int
    hard: int


def raise_limit() -> OpenFiles:
    """Raise this process's soft limit on open files to its hard limit, and say what it is.

    A system that refuses (a sandbox, say) leaves the limit as it was, with a warning naming
    it: the process still runs, with fewer clients at a time.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            _log.warning(
                "open-file limit stays at %d (raising it to %d was refused: %s); "
                "each client holds one, so that bounds the clients of this process",
                soft,
                target,
                error,
            )
            return OpenFiles(soft, soft, hard)
        return OpenFiles(soft, target, hard)
    return OpenFiles(soft, soft, hard)
