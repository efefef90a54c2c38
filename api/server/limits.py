"""Limits at the HTTP door: request bodies over ``max_bytes`` get a 413 before any route reads them, and
bodies not complete within ``timeout`` seconds a 408.

Pure ASGI, so it sees the declared ``Content-Length`` before the body is
read and counts chunked bodies as they arrive. Routes with tighter limits
of their own (an SDP offer, a style image) keep them. The deadline covers
the body only (from the headers to its last byte): a client that trickles a
byte a second holds its connection no longer than one that sends nothing
(the header deadline). A client that leaves mid-body is routine, not a
server error: it is logged at debug level, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.server.errors import error_response

log = logging.getLogger("api")

DISCONNECT: Message = {"type": "http.disconnect"}


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 10.0) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    def _refusal(self) -> ASGIApp:
        return error_response(
            413,
            f"request body larger than {self.max_bytes} bytes",
            "REQUEST/TOO_LARGE",
            {"max_body_bytes": self.max_bytes},
        )

    def _too_slow(self) -> ASGIApp:
        return error_response(
            408,
            f"request body not complete within {self.timeout:g} s",
            "REQUEST/TIMEOUT",
            {"body_timeout_s": self.timeout},
            headers={"Connection": "close"},  # the rest of the body may still be on its way
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        received, started, refused, complete = 0, False, False, False

        async def refuse(answer: ASGIApp) -> Message:
            """Answer in the route's place (unless it already began), and tell it the client went away."""
            nonlocal refused
            if not started:
                refused = True
                await answer(scope, receive, send)
            return DISCONNECT

        async def counting_receive() -> Message:
            """Counts a body sent without Content-Length and keeps its deadline; past either, answers
            413 or 408 and tells the route that the client went away, so it stops reading."""
            nonlocal received, complete
            if refused:
                return DISCONNECT
            if complete:  # after the body, a route waits only for the client to leave: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                return await refuse(self._too_slow())
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    return await refuse(self._refusal())
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the route's own answer, after ours
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except ClientDisconnect:
            log.debug(
                "%s %s: the client left before its request body was complete", scope["method"], scope["path"]
            )
        except Exception:
            if not refused:
                raise
