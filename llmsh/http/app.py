"""The ASGI app: routes of both APIs, the key check, the body limit, and errors in each API's own shape.

The guard is a plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so streamed responses and client
disconnects pass through untouched: a disconnect cancels the response task, which closes the generate stream,
which cancels the request in the engine at its next step.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llmsh.http import ollama_api, openai_api
from llmsh.http.config import HttpSettings
from llmsh.http.gateway import ApiError, Gateway


def error_response(path: str, err: ApiError) -> JSONResponse:
    """OpenAI's `{"error": {message, type, param, code}}` under /v1, Ollama's `{"error": "..."}` elsewhere."""
    if path.startswith("/v1"):
        body: dict[str, Any] = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    else:
        body = {"error": err.message}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, read at most `limit` bytes (413 past it, 400 if not a JSON object)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes; send a shorter prompt", "body_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    return data


class Guard:
    """Bearer key (constant-time compare) when one is set, and the body limit by Content-Length before any read."""

    def __init__(self, app: ASGIApp, settings: HttpSettings) -> None:
        self.app = app
        self.key = settings.key.encode() if settings.key else None
        self.max_body = settings.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        err = self._check(headers)
        if err is not None:
            await error_response(scope.get("path", ""), err)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, headers: dict[str, bytes]) -> ApiError | None:
        if self.key is not None:
            given = headers.get("authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the kernel's --http-key)",
                                "invalid_api_key")
        length = headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return ApiError(400, "Content-Length is not a number", "bad_request")
            if n > self.max_body:
                return ApiError(413, f"request body of {n} bytes is over the limit of {self.max_body} bytes; send a "
                                "shorter prompt", "body_too_large")
        return None


def build_app(kernel: Any, settings: HttpSettings) -> ASGIApp:
    """The app for one kernel (no CORS: browsers on other origins are not let in)."""
    gw = Gateway(kernel)
    ctx = openai_api.Api(gw, settings, read_json, error_response)
    oll = ollama_api.Api(gw, settings, read_json, error_response)
    routes = [*ctx.routes(), *oll.routes(), Route("/", lambda r: JSONResponse({"llmsh": "ok"}))]
    app = Starlette(routes=routes)
    return Guard(app, settings)
