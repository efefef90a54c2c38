"""A size limit at the HTTP door: request bodies over ``max_bytes`` get a 413 before any route reads them.

Pure ASGI, so it sees the declared ``Content-Length`` before the body is
read and counts chunked bodies as they arrive. Routes with tighter limits
of their own (an SDP offer, a style image) keep them.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.server.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> ASGIApp:
        return error_response(
            413,
            f"request body larger than {self.max_bytes} bytes",
            "REQUEST/TOO_LARGE",
            {"max_body_bytes": self.max_bytes},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return
        received, started, refused = 0, False, False

        async def counting_receive() -> Message:
            """Counts a body sent without Content-Length; past the limit, answers 413 and
            tells the route that the client went away, so it stops reading."""
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    refused = True
                    await self._refusal()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the route's own answer, after our 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except Exception:
            if not refused:
                raise
