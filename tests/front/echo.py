"""An ASGI app for the front's tests: it answers every request with what uvicorn made of it (the client
address and scheme after uvicorn's proxy headers, and the headers it received), as JSON."""

import json

from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echo the request's client, scheme, path and headers."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body", False):
        pass
    client = scope.get("client")
    body = json.dumps(
        {
            "client": client[0] if client else None,
            "scheme": scope["scheme"],
            "path": scope["path"],
            "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
