"""The one retry policy: exponential backoff with full jitter (redis-py's own implementation),
used by every loop that retries Redis, and by redis-py's own retries of a command.

Full jitter spreads the retries of many processes that failed at the same moment (every
gateway and worker when Redis restarts) instead of bringing them back together.
"""

from __future__ import annotations

from redis.backoff import ExponentialWithJitterBackoff

#: First retry within 50 ms, doubling, never more than 1 s apart.
POLICY = ExponentialWithJitterBackoff(cap=1.0, base=0.05)


def retry_delay_s(failures: int) -> float:
    """Seconds to wait before the next try, after ``failures`` failed tries in a row."""
    return POLICY.compute(failures)
