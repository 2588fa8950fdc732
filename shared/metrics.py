"""Every Prometheus metric of tokenrelay, named and described in one place, and how a process
exposes them.

Gateways serve ``/metrics`` on their own port; a worker serves it on
``TOKENRELAY_WORKER_METRICS`` (``host:port``) when set. Under ``tokenrelay gateway --workers N``
the processes share a ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode), so
any process answers a scrape for all of them.

Counts on the event path are kept as plain integers where the work happens (a gateway's
:class:`gateway.counters.Counters`) and added to these metrics once a second: a metric update
per delivered event would cost more than the delivery.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

#: The environment variable prometheus-client's multiprocess mode reads.
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

# Gateways

EVENTS_DELIVERED = Counter(
    "tokenrelay_gateway_events_delivered_total",
    "Events written to clients (one per client an event reaches).",
)
SUBSCRIBERS = Gauge(
    "tokenrelay_gateway_subscribers",
    "Clients following a message.",
    multiprocess_mode="livesum",
)
FOLLOWED_MESSAGES = Gauge(
    "tokenrelay_gateway_followed_messages",
    "Messages a gateway follows (one tail each).",
    multiprocess_mode="livesum",
)
RESUMES = Counter(
    "tokenrelay_gateway_resumes_total",
    "Stream requests with a Last-Event-ID, by outcome: memory (answered from the gateway's "
    "memory), redis (read from Redis), truncated (older than the stream keeps), finished "
    "(204, nothing more), rewound (lost in a failover: the answer again), refused (400/404).",
    ["outcome"],
)
SLOW_CLIENT_DETACHES = Counter(
    "tokenrelay_gateway_slow_client_detaches_total",
    "Clients that fell behind the live stream and caught up from Redis at their own pace.",
)
SEND_TIMEOUTS = Counter(
    "tokenrelay_gateway_send_timeouts_total",
    "Clients disconnected for reading nothing for TOKENRELAY_SEND_TIMEOUT_S.",
)
HEADER_TIMEOUTS = Counter(
    "tokenrelay_gateway_header_timeouts_total",
    "Connections closed for not completing a request head in TOKENRELAY_HEADER_TIMEOUT_S.",
)
REWINDS = Counter(
    "tokenrelay_gateway_rewinds_total",
    "Messages whose delivered events Redis lost in a failover (their readers started again).",
)
QUEUED_JOBS = Gauge(
    "tokenrelay_queue_jobs",
    "Jobs queued or being generated (sampled by gateways once a second).",
    multiprocess_mode="max",
)
OLDEST_JOB_AGE = Gauge(
    "tokenrelay_queue_oldest_job_age_seconds",
    "Age of the oldest job queued or being generated.",
    multiprocess_mode="max",
)
REFUSED_REQUESTS = Counter(
    "tokenrelay_gateway_refused_requests_total",
    "Requests refused before anything was written, by reason.",
    ["reason"],
)

# Workers

TIME_TO_FIRST_TOKEN = Histogram(
    "tokenrelay_worker_time_to_first_token_seconds",
    "From a job's queueing to its first event appended.",
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_GAP = Histogram(
    "tokenrelay_worker_inter_token_seconds",
    "Between consecutive events appended to one message.",
    buckets=_LATENCY_BUCKETS,
)
EVENTS_APPENDED = Counter(
    "tokenrelay_worker_events_appended_total",
    "Events appended to message streams, by kind.",
    ["kind"],
)
MESSAGES = Counter(
    "tokenrelay_worker_messages_total",
    "Generations ended, by outcome: done, error, cancelled, taken_over (another worker "
    "has it now), skipped (gone, finished or owned before it started).",
    ["outcome"],
)
GENERATIONS = Gauge(
    "tokenrelay_worker_generations",
    "Generations running.",
    multiprocess_mode="livesum",
)
TAKEOVERS = Counter(
    "tokenrelay_worker_takeovers_total",
    "Jobs taken over from a worker whose lease lapsed.",
)
DEAD_LETTERS = Counter(
    "tokenrelay_worker_dead_letters_total",
    "Jobs moved to the dead letters after losing their worker too often.",
)
CANCELLATIONS = Counter(
    "tokenrelay_worker_cancellations_total",
    "Generations cancelled, by reason (requested, disconnected).",
    ["reason"],
)
UPSTREAM_ERRORS = Counter(
    "tokenrelay_worker_upstream_errors_total",
    "Model backend failures, by error type.",
    ["type"],
)

# Both

REDIS_SECONDS = Histogram(
    "tokenrelay_redis_seconds",
    "Redis round trips, by operation (a pipeline or a batch of appends is one).",
    ["operation"],
    buckets=_REDIS_BUCKETS,
)


def exposition() -> tuple[bytes, str]:
    """The body and content type of a scrape: this process's metrics, or every process's
    under the multiprocess mode."""
    if os.environ.get(MULTIPROC_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_gone(pid: int) -> None:
    """Drop a stopped process's live gauges (multiprocess mode)."""
    if os.environ.get(MULTIPROC_DIR):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
