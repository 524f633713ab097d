"""Serve's own overload answers in OpenAI's error shape.

Two answers never reach the app: Serve's proxy itself answers ``503`` when a deployment's queue is
full (``serve.max_queued_requests``; with ``Retry-After``) and ``408`` when a request outlives the
proxy's ``request_timeout_s``, both in plain text. OpenAI clients parse ``{"error": {"message",
"type", "code"}}``, so ``OpenAIErrors``, an ASGI middleware, rewrites any non-JSON error answer
(408, 429, 500, 503, 504) the proxy sends into that shape, keeping its status and headers
(``Retry-After`` included). The app's own errors are JSON already and pass untouched.

Serve loads proxy middlewares from the callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
in the proxy's environment, read when the proxy starts: ``install()`` sets it for a Ray this process
starts (``jobs.serve`` does, before ``ray.init``); a cluster started with ``ray start`` needs it in
that command's environment (docs/serve.md).
"""

from __future__ import annotations

import json
import os

ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "pipeline.serve.errors.proxy_middlewares"
REWRITTEN = {408: ("timeout_error", "request_timeout"), 429: ("rate_limit_error", "rate_limit_exceeded"),
             500: ("server_error", "internal_error"), 503: ("server_error", "server_overloaded"),
             504: ("timeout_error", "request_timeout")}  # the types the app's own errors use


def error_body(status: int, message: str) -> dict:
    kind, code = REWRITTEN.get(status, ("server_error", "error"))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAIErrors:
    """ASGI middleware: a plain-text error answer becomes an OpenAI error body (same status and headers)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                headers = dict((k.lower(), v) for k, v in message.get("headers", []))
                if message["status"] in REWRITTEN and b"json" not in headers.get(b"content-type", b""):
                    held["start"], held["body"] = message, b""
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                text = held["body"].decode("utf-8", "replace").strip() or f"HTTP {start['status']}"
                body = json.dumps(error_body(start["status"], text)).encode()
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**start, "headers": headers})
                return await send({"type": "http.response.body", "body": body, "more_body": False})
            await send(message)

        await self.app(scope, receive, wrapped)


def proxy_middlewares() -> list:
    """The callback Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]


def install() -> None:
    """Name the callback in this process's environment, inherited by a Ray it starts (and so by Serve's proxy)."""
    os.environ.setdefault(ENV, CALLBACK)
