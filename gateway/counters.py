"""What one gateway process counts of its own work (tests and benchmarks read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Counters:
    #: Stream reads (XRANGE/XREVRANGE calls, pipelined with the meta or not) the fan-out made:
    #: its whole read cost in Redis.
    reads: int = 0
    #: Times a client written directly could not keep up and went back to reading the stream.
    fell_behind: int = 0
    #: Streams whose live events the tail wrote to the client's socket itself.
    direct_streams: int = 0
    #: Streams answered through the ASGI ``send`` loop (no socket was offered).
    asgi_streams: int = 0
    #: Stream GETs the server adapter answered itself, without the application.
    fast_path_answers: int = 0
    #: Messages whose delivered events Redis lost (a failover), whose readers started again.
    rewinds: int = 0
    #: Clients disconnected for reading nothing for TOKENRELAY_SEND_TIMEOUT_S.
    send_timeouts: int = 0
    #: Connections closed for not completing a request head in TOKENRELAY_HEADER_TIMEOUT_S.
    header_timeouts: int = 0
    #: Events handed to clients' sockets (one per client an event reaches).
    delivered: int = 0
    #: Stream requests with a cursor, by outcome (see shared.metrics.RESUMES).
    resumed_from_memory: int = 0
    resumed_from_redis: int = 0
    resumed_truncated: int = 0
    resumed_finished: int = 0
    resumed_rewound: int = 0
    resumes_refused: int = 0
