"""The event-stream GETs the gateway protocol may answer itself (see gateway.protocol)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.render import Renderer
from gateway.resume import MessageInfo
from shared.messages import is_message_id


@dataclass(frozen=True, slots=True)
class WarmRoute:
    """``GET <prefix><message id><suffix>``, streamed with ``renderer``.

    It must answer exactly as the application's endpoint for the same path does, given a start
    point found in memory: the tests compare the two byte for byte.
    """

    prefix: bytes
    suffix: bytes
    renderer: Callable[[str, MessageInfo], Renderer]
    #: Whether the stream starts with the ``retry:`` hint (as ``stream_from`` decides).
    retry_hint: bool

    def message_id(self, path: bytes) -> str | None:
        """The message id of ``path`` when this route takes it."""
        if not (path.startswith(self.prefix) and path.endswith(self.suffix)):
            return None
        end = len(path) - len(self.suffix)
        if end <= len(self.prefix):
            return None
        message_id = path[len(self.prefix) : end].decode("ascii")
        return message_id if is_message_id(message_id) else None
