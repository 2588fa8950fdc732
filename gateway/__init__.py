"""Stateless Starlette gateways: relay message streams from Redis to HTTP clients as SSE.

Layers, bottom to top. A module imports only from its own layer or from layers above it in
this list, never from a layer below it, and no import cycle exists, even under TYPE_CHECKING
(tests/gateway/test_layers.py holds the code to this picture)::

    wire       positions, errors, frames, http_wire, requests, message_tokens, response_requests,
               response_events, ui_messages
               pure code: event-stream framing of every format, HTTP bytes every answer
               shares, request and cursor validation, the errors and their JSON bodies,
               signed per-message tokens
    core       counters, batches, redis_reads, replay, tail, subscriber, hub, admission,
               metrics, access, idempotency
               the fan-out: one tail per followed message, a subscriber per client; who
               may do what (keys, tokens); no HTTP bytes, no ASGI
    delivery   delivery
               the one streaming loop, and the one interface to a client's socket
    surfaces   state, responses, bodies, generations, chat_routes, openai_routes,
               responses_routes, ui_routes, ops_routes, routes, app
               the Starlette application: endpoints declared once in one table
    adapter    request_heads, serving, fast_path, server
               how uvicorn serves it: request heads read with httptools, the process's
               lifespan, which requests are answered from memory; server is the only
               module that imports uvicorn
"""
