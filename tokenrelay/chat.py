"""``tokenrelay chat``: stream an answer to the terminal, resuming across dropped connections."""

from __future__ import annotations

from typing import TextIO

from tokenrelay.client import Reset, StreamCancelled, StreamFailed, TokenrelayClient


async def chat(url: str, prompt: str, max_tokens: int | None, out: TextIO, err: TextIO) -> int:
    """Print the answer to ``prompt`` as it arrives; notes (resumes, restarts) go to ``err``.

    Returns the exit status: 0 for a complete answer, 1 when it failed or was cancelled.
    """
    async with TokenrelayClient(url) as client:
        try:
            stream = await client.ask(prompt, max_tokens=max_tokens)
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
