"""Stateless Starlette gateways: relay message streams from Redis to HTTP clients as SSE."""
