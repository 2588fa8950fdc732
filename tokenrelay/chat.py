"""``tokenrelay chat``: stream an answer to the terminal, resuming across dropped connections."""

from __future__ import annotations

from typing import TextIO

from tokenrelay.client import Reset, StreamCancelled, StreamFailed, TokenrelayClient


async def chat(
    url: str,
    prompt: str,
    max_tokens: int | None,
    out: TextIO,
    err: TextIO,
    *,
    give_up_after_s: float = 15.0,
) -> int:
    """Print the answer to ``prompt`` as it arrives; notes (resumes, restarts) go to ``err``.

    Returns the exit status: 0 for a complete answer, 1 when it failed or was cancelled, or
    the server could not be reached for ``give_up_after_s`` (one line says so).
    """
    async with TokenrelayClient(url, give_up_after_s=give_up_after_s) as client:
        try:
            try:
                # It asks again (with an Idempotency-Key) until give_up_after_s has passed.
                stream = await client.ask(prompt, max_tokens=max_tokens)
            except StreamFailed as exc:
                if exc.error_type != "unreachable":
                    raise
                cause = exc.__cause__
                reason = str(cause) or type(cause).__name__ if cause is not None else str(exc)
                err.write(f"tokenrelay chat: cannot reach {url}: {reason}\n")
                return 1
            reconnects = 0
            async for piece in stream:
                if stream.reconnects != reconnects:
                    reconnects = stream.reconnects
                    err.write(f"\n[connection lost; resumed after event {stream.last_event_id}]\n")
                if isinstance(piece, Reset):
                    err.write("\n[another worker took over: the answer starts again]\n")
                    out.write("\n")
                    continue
                out.write(piece.text)
                out.flush()
        except (StreamFailed, StreamCancelled) as exc:
            err.write(f"\n[{exc}]\n")
            return 1

    out.write("\n")
    return 0
