"""ASGI middleware at the door: bodies above the size limit get 413, NUL characters in a path or query 400."""

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.api.problems import MEDIA_TYPE, PROBLEM_TYPE


class BodyTooLarge(HTTPException):
    """The body grew past the limit while it was being read (an HTTPException, because FastAPI turns
    any other error raised while it reads a body into a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodyLimit:
    """Answer 413 when Content-Length, or the bytes actually received, exceed `max_bytes`; 400 for a NUL
    character in the path or query string."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"].lower():
            # PostgreSQL cannot store or compare text with NUL characters; refuse them at the door.
            await self._refuse(send, 400, "Bad Request", "the path or query holds a NUL character")
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            await self._refuse(send, 400, "Bad Request", "Content-Length is not a number")
            return
        if length is not None and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(
        self, send: Send, status: int = 413, title: str = "Content Too Large", detail: str | None = None
    ) -> None:
        body = json.dumps(
            {
                "type": PROBLEM_TYPE + title.lower().replace(" ", "-"),
                "title": title,
                "status": status,
                "detail": detail or f"the request body is larger than {self.max_bytes} bytes",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", MEDIA_TYPE.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
