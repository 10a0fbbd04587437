"""Errors as each API shapes them: every failure a client can cause or see has its API's body
(OpenAI's, or Anthropic's on /v1/messages), never a trace."""

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


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> bytes:
    """Anthropic's error shape: the type follows from the status, as its API documents."""
    type_ = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}}).encode()


def error_response(err: ApiError, headers: dict[str, str], shape: str = "openai") -> web.Response:
    if shape == "anthropic":
        body = anthropic_error_body(err.status, err.message)
    else:
        body = error_body(err.message, err.type, err.param, err.code)
    return web.Response(
        status=err.status,
        body=body,
        content_type="application/json",
        headers={**headers, **err.headers},
    )


def sse_error_event(message: str, code: str = "upstream_error", shape: str = "openai") -> bytes:
    """Ends a stream that broke after its first byte (the status line was already sent)."""
    if shape == "anthropic":
        return b"event: error\ndata: " + anthropic_error_body(502, message) + b"\n\n"
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
