"""A gateway's Prometheus metrics (shared.metrics names them): its plain counters added once a
second (and at each scrape), its gauges sampled then."""

from __future__ import annotations

import dataclasses

from gateway.admission import Admission
from gateway.counters import Counters
from gateway.hub import Hub
from shared import metrics

_RESUMES = {
    "resumed_from_memory": "memory",
    "resumed_from_redis": "redis",
    "resumed_truncated": "truncated",
    "resumed_finished": "finished",
    "resumed_rewound": "rewound",
    "resumes_refused": "refused",
}
_COUNTERS = {
    "delivered": metrics.EVENTS_DELIVERED,
    "fell_behind": metrics.SLOW_CLIENT_DETACHES,
    "send_timeouts": metrics.SEND_TIMEOUTS,
    "header_timeouts": metrics.HEADER_TIMEOUTS,
    "rewinds": metrics.REWINDS,
    **{name: metrics.RESUMES.labels(outcome) for name, outcome in _RESUMES.items()},
}


class GatewayMetrics:
    """What one gateway process adds to the metrics."""

    def __init__(self, hub: Hub, admission: Admission) -> None:
        self._hub = hub
        self._admission = admission
        self._added = Counters()

    def update(self) -> None:
        counters, added = self._hub.counters, self._added
        for name, metric in _COUNTERS.items():
            delta = getattr(counters, name) - getattr(added, name)
            if delta:
                metric.inc(delta)
        self._added = dataclasses.replace(counters)
        metrics.SUBSCRIBERS.set(self._hub.subscriber_count)
        metrics.FOLLOWED_MESSAGES.set(self._hub.tail_count)
        depth = self._admission.depth
        if depth is not None:
            metrics.QUEUED_JOBS.set(depth.jobs)
            metrics.OLDEST_JOB_AGE.set(depth.oldest_s)
