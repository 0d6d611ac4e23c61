"""OpenAI's API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE streams end with
`data: [DONE]`). One choice per request: `n` > 1 is a 400 (send n requests: they are batched together)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmsh.http.config import HttpSettings
from llmsh.http.gateway import ApiError, Gateway, bad, request_nice

UNSUPPORTED = {  # parameter → why (a value other than the default is refused, never silently ignored)
    "logprobs": "log-probabilities are not returned by llmsh",
    "top_logprobs": "log-probabilities are not returned by llmsh",
    "echo": "echo is not supported; the prompt is not returned",
    "best_of": "best_of is not supported; send separate requests",
    "tools": "tool calls are not supported",
    "functions": "function calls are not supported",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "logit_bias": "logit_bias is not supported",
}
PENALTIES = ("presence_penalty", "frequency_penalty")


def _params(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sampling fields → llmsh's (ranges are checked by the engine, which names the bad value)."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n", f"n={n!r}: llmsh returns one choice per request; send {n} requests instead (they are batched together)")
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False, 0, 1 if key == "best_of" else None, [], {}):
            raise bad(key, f"{key}: {why}")
    for key in PENALTIES:
        if body.get(key) not in (None, 0, 0.0):
            raise bad(key, f"{key} is not supported; use repetition_penalty (> 1 discourages repeats)")
    params: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise bad("max_tokens", f"max_tokens must be a positive integer, got {max_tokens!r}")
        params["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "repetition_penalty"):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise bad(key, f"{key} must be a number, got {v!r}")
            params[key] = float(v)
    for key in ("seed", "top_k"):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(key, f"{key} must be an integer, got {v!r}")
            params[key] = v
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "stop must be a string or a list of non-empty strings")
        if stop:
            params["stop"] = stop
    if body.get("ignore_eos") is True:  # vLLM's extension, for benchmarks
        params["ignore_eos"] = True
    return params


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}]", f"messages[{i}]: role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{i}].content", f"messages[{i}]: only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"messages[{i}]: content must be a string")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _prompt(body: dict[str, Any]) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise bad("prompt", "prompt must be a string (one prompt per request; token-id prompts are not supported)")
    return p


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class Api:
    """The /v1 routes over one `Gateway`."""

    def __init__(self, gw: Gateway, settings: HttpSettings, read_json: Callable[..., Awaitable[dict[str, Any]]],
                 error_response: Callable[[str, ApiError], Response]) -> None:
        self.gw, self.settings, self.read_json, self.error_response = gw, settings, read_json, error_response

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"])]

    async def models(self, request: Request) -> Response:
        """The loaded processes, by name."""
        data = [{"id": r["name"], "object": "model", "created": int(r["started_at"]), "owned_by": "llmsh",
                 "llmsh": {"pid": r["pid"], "state": r["state"], "nice": r["nice"], "path": r["path"]}}
                for r in self.gw.table.snapshot()]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        path = request.url.path
        client = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
        try:
            body = await self.read_json(request, self.settings.max_body)
            self.gw.count("in", f"POST {path}", int(request.headers.get("content-length") or 0), client)
            params = _params(body)
            text_in: dict[str, Any] = {"messages": _messages(body)} if chat else {"prompt": _prompt(body)}
            nice = request_nice(request.headers, self.settings.min_nice)
            entry = await self.gw.entry(body.get("model"), nice=nice)
            result: dict[str, Any] = {}
            pieces = self.gw.stream(entry, params=params, client=client, result=result, **text_in)
            first = await self.gw.first(request, pieces)
        except ApiError as e:
            return self.error_response(path, e)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": entry.name, "system_fingerprint": f"llmsh-pid{entry.pid}"}
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
            return StreamingResponse(self._events(meta, first, pieces, result, chat, usage, path, client),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text = await self.gw.collect(request, first, pieces)
        except ApiError as e:
            return self.error_response(path, e)
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(result), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        out = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
               "usage": _usage(result)}
        resp = JSONResponse(out)
        self.gw.count("out", f"POST {path}", len(resp.body), client)
        return resp

    async def _events(self, meta: dict[str, Any], first: str | None, pieces: AsyncIterator[str], result: dict[str, Any],
                      chat: bool, usage: bool, path: str, client: str) -> AsyncIterator[bytes]:
        """The SSE stream: role chunk (chat), one chunk per piece, the finish chunk, usage (if asked), [DONE]."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if usage else {}
        sent, finished = 0, False

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if role:
                    delta["role"] = "assistant"
                c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({**meta, "object": obj, "choices": [c], **extra})

        try:
            if chat:
                yield chunk("", None, role=True)
            if first is not None:
                yield chunk(first, None)
            async for piece in pieces:
                data = chunk(piece, None)
                sent += len(data)
                yield data
            yield chunk(None if chat else "", _finish(result))
            if usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(result)})
            yield b"data: [DONE]\n\n"
            finished = True
        except ApiError as e:  # mid-stream: the status is already sent; OpenAI clients raise on an error event
            finished = True
            yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        finally:
            self.gw.count("out", f"POST {path}", sent, client)
            if not finished:  # the client went away: starlette cancelled this stream, and with it the request
                self.gw.disconnected()


def _finish(result: dict[str, Any]) -> str:
    reason = str(result.get("finish_reason") or "stop")
    return "length" if reason == "length" else "stop"


def _usage(result: dict[str, Any]) -> dict[str, int]:
    p, c = int(result.get("prompt_tokens") or 0), int(result.get("tokens") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
