"""The single exception every decoder in :mod:`wire` raises."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message that does not follow the protocol.

    ``code`` is one of :class:`wire.messages.ErrorCode`'s values, so a server
    can answer the peer with ``error_message(exc.code, str(exc))`` directly.
    """

    def __init__(self, message: str, code: str = "bad_message") -> None:
        super().__init__(message)
        self.code = code
