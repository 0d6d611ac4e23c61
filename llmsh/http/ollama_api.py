"""Ollama's API: POST /api/generate, POST /api/chat (NDJSON streams, `stream` defaults to true), GET /api/tags,
GET /api/ps, GET /api/version.

Mapping: `options.num_predict` → max_tokens (−1/−2: the engine's default), `temperature`, `top_p`, `top_k`, `seed`,
`stop`, `repeat_penalty` → repetition_penalty; `num_ctx` → the KV length of a process loaded on demand by this
request; `keep_alive` → llmsh's keepalive (idle time before the weights are paged out; negative: never; 0: at once).
/api/generate formats the prompt (and `system`) with the model's chat template, as Ollama does, unless `raw` is true
or the model has none: then the prompt goes as it is (`system` put in front); /api/chat uses the chat template.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmsh import __version__
from llmsh.http.config import HttpSettings
from llmsh.http.gateway import ApiError, Gateway, bad, request_nice
from llmsh.kernel.errors import KernelError
from llmsh.models import find_models

OPTION_KEYS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
               "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty"}
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?$")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def keep_alive_seconds(value: Any) -> float | None | str:
    """Ollama's keep_alive ("5m", "1h30m" not supported, 300, -1) → seconds; None = forever; "unset" if absent."""
    if value is None:
        return "unset"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value < 0 else float(value)
    m = _DURATION.match(str(value).strip()) if isinstance(value, str) else None
    if m is None:
        raise bad("keep_alive", f"keep_alive {value!r}: give seconds or a duration like '5m', '30s', '-1' (forever)")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    return None if seconds < 0 else seconds


def options(body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """`options` → (llmsh sampling params, num_ctx)."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise bad("options", "options must be an object")
    params: dict[str, Any] = {}
    for key, ours in OPTION_KEYS.items():
        v = opts.get(key)
        if v is None:
            continue
        if key == "num_predict" and isinstance(v, int) and v < 0:  # -1 infinite, -2 fill the context: the default
            continue
        if key == "stop":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise bad("options.stop", "options.stop must be a list of non-empty strings")
        params[ours] = v
    num_ctx = opts.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        raise bad("options.num_ctx", f"options.num_ctx must be a positive integer, got {num_ctx!r}")
    if body.get("format"):
        raise bad("format", "format (structured output) is not supported by llmsh")
    return params, num_ctx


def _details(arch: str) -> dict[str, Any]:
    return {"parent_model": "", "format": "safetensors", "family": arch, "families": [arch] if arch else None,
            "parameter_size": "", "quantization_level": ""}


class Api:
    """The /api routes over one `Gateway`."""

    def __init__(self, gw: Gateway, settings: HttpSettings, read_json: Callable[..., Awaitable[dict[str, Any]]],
                 error_response: Callable[[str, ApiError], Response]) -> None:
        self.gw, self.settings, self.read_json, self.error_response = gw, settings, read_json, error_response

    def routes(self) -> list[Route]:
        return [Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/tags", self.tags, methods=["GET"]),
                Route("/api/ps", self.ps, methods=["GET"]),
                Route("/api/version", self.version, methods=["GET"])]

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__, "server": "llmsh"})

    async def tags(self, request: Request) -> Response:
        """What can be loaded (model dirs, HF cache), then loaded processes not among them."""
        import asyncio

        models = await asyncio.to_thread(find_models)
        out, seen = [], set()
        for m in models:
            seen.add(m["path"])
            out.append({"name": m["name"], "model": m["name"], "modified_at": _now(), "size": int(m["bytes"]),
                        "digest": "", "details": _details(m.get("arch", ""))})
        for r in self.gw.table.snapshot():
            if r["path"] not in seen:
                out.append({"name": r["name"], "model": r["name"], "modified_at": _now(), "size": r["res_bytes"],
                            "digest": "", "details": _details("")})
        return JSONResponse({"models": out})

    async def ps(self, request: Request) -> Response:
        """Loaded processes (resident bytes; on a GPU they count as VRAM)."""
        await self.gw.procs.refresh()
        out = []
        for r in self.gw.table.snapshot():
            vram = r["res_bytes"] if str(r["device"]).startswith("cuda") else 0
            out.append({"name": r["name"], "model": r["name"], "size": r["res_bytes"], "size_vram": vram, "digest": "",
                        "details": _details(""), "expires_at": _now(),
                        "llmsh": {"pid": r["pid"], "state": r["state"], "nice": r["nice"]}})
        return JSONResponse({"models": out})

    async def generate(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        path = request.url.path
        client = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
        t0 = time.perf_counter()
        try:
            body = await self.read_json(request, self.settings.max_body)
            self.gw.count("in", f"POST {path}", int(request.headers.get("content-length") or 0), client)
            params, num_ctx = options(body)
            keep = keep_alive_seconds(body.get("keep_alive"))
            text_in = self._input(body, chat)
            nice = request_nice(request.headers, self.settings.min_nice)
            entry = await self.gw.entry(body.get("model"), nice=nice, ctx=num_ctx)
            await self.gw.procs.ensure_loaded(entry)
            if text_in is not None and not chat and not body.get("raw") and await self.gw.templated(entry):
                text_in = {"messages": self._as_messages(body)}
            t_loaded = time.perf_counter()
            if keep != "unset":
                await self.gw.procs.memory("keepalive", entry, seconds=keep)
            if text_in is None:  # Ollama: no prompt = load (or, with keep_alive 0, unload) and answer at once
                reason = "unload" if keep == 0 else "load"
                done = {"model": body["model"], "created_at": _now(), "done": True, "done_reason": reason}
                done.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
                return JSONResponse(done)
            result: dict[str, Any] = {}
            pieces = self.gw.stream(entry, params=params, client=client, result=result, **text_in)
            first = await self.gw.first(request, pieces)
        except KernelError as e:
            return self.error_response(path, ApiError.from_kernel(e))
        except ApiError as e:
            return self.error_response(path, e)
        model = body["model"]
        times = (t0, t_loaded)
        if body.get("stream", True):
            return StreamingResponse(self._lines(model, chat, first, pieces, result, times, path, client),
                                     media_type="application/x-ndjson")
        try:
            text = await self.gw.collect(request, first, pieces)
        except ApiError as e:
            return self.error_response(path, e)
        out = {"model": model, "created_at": _now(), **self._text(chat, text), **self._final(result, times)}
        return JSONResponse(out)

    @staticmethod
    def _input(body: dict[str, Any], chat: bool) -> dict[str, Any] | None:
        if body.get("images"):
            raise bad("images", "images are not supported by llmsh")
        if chat:
            msgs = body.get("messages")
            if msgs is None or msgs == []:
                return None
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                                     and isinstance(m.get("content"), str) for m in msgs):
                raise bad("messages", "messages must be a list of {role: system|user|assistant, content: string}")
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            return None
        if not isinstance(prompt, str):
            raise bad("prompt", "prompt must be a string")
        system = body.get("system")
        return {"prompt": f"{system}\n\n{prompt}" if isinstance(system, str) and system else prompt}

    @staticmethod
    def _as_messages(body: dict[str, Any]) -> list[dict[str, str]]:
        """/api/generate's prompt as one user turn (after the system message, if any) for the chat template."""
        system = body.get("system")
        msgs = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        return [*msgs, {"role": "user", "content": str(body["prompt"])}]

    @staticmethod
    def _text(chat: bool, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

    @staticmethod
    def _final(result: dict[str, Any], times: tuple[float, float]) -> dict[str, Any]:
        t0, t_loaded = times
        now = time.perf_counter()
        reason = "length" if result.get("finish_reason") == "length" else "stop"
        return {"done": True, "done_reason": reason, "total_duration": int((now - t0) * 1e9),
                "load_duration": int((t_loaded - t0) * 1e9), "prompt_eval_count": int(result.get("prompt_tokens") or 0),
                "eval_count": int(result.get("tokens") or 0), "eval_duration": int((now - t_loaded) * 1e9)}

    async def _lines(self, model: str, chat: bool, first: str | None, pieces: AsyncIterator[str], result: dict[str, Any],
                     times: tuple[float, float], path: str, client: str) -> AsyncIterator[bytes]:
        """NDJSON: one object per piece, then the final one with the counts."""
        sent, finished = 0, False

        def line(obj: dict[str, Any]) -> bytes:
            return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

        try:
            if first is not None:
                yield line({"model": model, "created_at": _now(), **self._text(chat, first), "done": False})
            async for piece in pieces:
                data = line({"model": model, "created_at": _now(), **self._text(chat, piece), "done": False})
                sent += len(data)
                yield data
            yield line({"model": model, "created_at": _now(), **self._text(chat, ""), **self._final(result, times)})
            finished = True
        except ApiError as e:
            finished = True
            yield line({"error": e.message})
        finally:
            self.gw.count("out", f"POST {path}", sent, client)
            if not finished:  # the client went away: starlette cancelled this stream, and with it the request
                self.gw.disconnected()
