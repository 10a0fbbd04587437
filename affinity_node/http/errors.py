"""OpenAI-style errors: every failure a client can cause or see has this body, never a trace."""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def error_response(err: ApiError, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=err.status,
        body=error_body(err.message, err.type, err.param, err.code),
        content_type="application/json",
        headers={**headers, **err.headers},
    )


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """Ends a stream that broke after its first byte (the status line was already sent)."""
    return b"data: " + error_body(message, "server_error", None, code) + b"\n\n"


def short(text: str, limit: int = 64) -> str:
    """Client text echoed in a message: bounded and printable."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        "invalid_request_error",
        None,
        "invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
