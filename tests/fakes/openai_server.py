"""A local OpenAI-compatible server (``POST /v1/chat/completions``) for tests and benches.

It also serves ``POST /v1/embeddings`` (:func:`fake_embedding`: a deterministic hashed
bag of words, so texts sharing words are close). The tests drive the real ``openai`` SDK
over real HTTP against it, so request building, status handling, ``Retry-After``,
timeouts and JSON parsing are exercised for real. It runs on starlette + uvicorn (both
come with Airflow) in a background thread with its own event loop, and latency is an
``asyncio.sleep``: hundreds of requests can be in flight at once, so a benchmark of 32
concurrent requests at 50 ms measures the client, not the server. Options and faults:
:class:`FakeOpenAI`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import re
import socket
import threading
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Responder = Callable[[dict[str, Any]], str]
FAULTS = ("429", "500", "hang", "invalid_json", "schema_invalid")


@dataclass
class RecordedRequest:
    at: float  # time.monotonic() at arrival
    body: dict[str, Any]
    status: int = 0
    fault: str | None = None
    path: str = "/v1/chat/completions"
    content_type: str | None = None  # the request's Content-Type header
    usage: dict[str, Any] | None = None  # the ``usage`` of a 200 chat completion sent back

    @property
    def response_format(self) -> str | None:
        fmt = self.body.get("response_format") or {}
        return fmt.get("type") if isinstance(fmt, dict) else None


@dataclass
class _Fault:
    kind: str
    retry_after: float | None
    hang: float


_Handler = Callable[[dict[str, Any], _Fault | None], Awaitable[Response]]


def example_from_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Any:
    """A small instance valid for ``schema`` (objects, arrays, enums, bounds, $ref, anyOf)."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return example_from_schema(root["$defs"][name], root)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        non_null = [s for s in schema["anyOf"] if s.get("type") != "null"]
        return example_from_schema(non_null[0], root) if non_null else None
    kind = schema.get("type")
    if kind == "object":
        return {k: example_from_schema(v, root) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [example_from_schema(schema["items"], root)
                for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    pattern = schema.get("pattern", "")
    if "[0-9]" in pattern:
        return "12345"
    return "example text".ljust(max(schema.get("minLength", 0), 12), "x")


def default_responder(body: dict[str, Any]) -> str:
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return json.dumps(example_from_schema(fmt["json_schema"]["schema"]))
    if fmt.get("type") == "json_object" and "schema" in fmt:
        return json.dumps(example_from_schema(fmt["schema"]))
    return "{}"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


_WORD = re.compile(r"[a-z0-9]+")


def fake_embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector: lower-cased words hashed (signed) into ``dim`` buckets.

    Each distinct word adds ``±(1 + log count)`` to one bucket (blake2b, so the same in
    every process), then the vector is L2-normalised: texts sharing words are close in
    cosine. A text without words hashes as a whole, so no vector is zero.
    """
    counts = Counter(_WORD.findall(text.lower())) or Counter({text: 1})
    vector = [0.0] * dim
    for word, count in counts.items():
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest[:4], "little") % dim
        vector[bucket] += (1.0 + math.log(count)) * (1.0 if digest[4] & 1 else -1.0)
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _refusal(shape: str) -> JSONResponse:
    """A server's refusal of the ``json_schema`` response format, in ``shape``."""
    if shape == "422":
        return JSONResponse({"detail": [{
            "type": "literal_error", "loc": ["body", "response_format", "type"],
            "msg": "Input should be 'text' or 'json_object'", "input": "json_schema"}]}, 422)
    if shape == "500":
        return JSONResponse({"error": {"message": (
            "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  "
            "Input should be 'text' or 'json_object' [type=literal_error, "
            "input_value='json_schema', input_type=str]"),
            "type": "internal_server_error", "param": None, "code": None}}, 500)
    return JSONResponse(_error(
        "response_format type 'json_schema' is not supported by this server",
        "invalid_request_error", param="response_format"), 400)


class FakeOpenAI:
    """The server; use as a context manager (``with FakeOpenAI() as server: server.url``).

    - ``responder(body) -> str``: decides the assistant message content from the request
      JSON. The default builds a valid instance of the ``json_schema`` sent in
      ``response_format`` (:func:`example_from_schema`), or ``{}`` in JSON mode.
    - ``latency``: seconds before each answer.
    - :meth:`fail_next`: the next N requests get a fault: ``"429"`` (with
      ``Retry-After``), ``"500"``, ``"hang"`` (sleep ``hang`` seconds, past the client's
      timeout), ``"invalid_json"`` (content is not JSON), ``"schema_invalid"`` (JSON that
      breaks the schema). On ``/v1/embeddings`` the same faults apply: ``"invalid_json"``
      is a 200 whose body is not JSON, ``"schema_invalid"`` one embedding fewer than inputs.
    - ``reject_json_schema``: refuse a ``json_schema`` response_format as servers
      without structured outputs do: ``True`` or ``"400"`` (OpenAI-style 400), ``"422"``
      (a validation error, as FastAPI servers give) or ``"500"`` (llama.cpp's Python
      server: a 500 saying ``Input should be 'text' or 'json_object'``).
    - ``reject_schema_in_json_mode``: also refuse ``json_object`` with a ``schema`` beside
      it (a 400), as a strict server does; JSON mode with a schema otherwise answers an
      instance of that schema, as llama.cpp's servers do.
    - Embeddings are ``float`` or ``base64`` encoded, of the request's ``dimensions`` or
      ``embedding_dim``.
    - ``upstream``: an OpenAI-compatible base URL (a real model server) that answers every
      chat request no fault or refusal above answered, its reply passed back as it is:
      a recording, fault-injecting proxy in front of a real server.
    - ``max_in_flight``: the most requests handled at once; ``requests``: every request
      (arrival time, body, status, fault, and the ``usage`` of each completion sent back).
    """

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency: float = 0.0,
        reject_json_schema: bool | str = False,
        reject_schema_in_json_mode: bool = False,
        model: str = "fake-model",
        embedding_dim: int = 256,
        upstream: str | None = None,
    ) -> None:
        self.responder = responder or default_responder
        self.latency = latency
        self.reject_json_schema = "400" if reject_json_schema is True else reject_json_schema
        self.reject_schema_in_json_mode = reject_schema_in_json_mode
        self.model = model
        self.embedding_dim = embedding_dim
        self.upstream = upstream
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: deque[_Fault] = deque()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/embeddings", self._embeddings, methods=["POST"])])
        config = uvicorn.Config(app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1, backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)

    @property
    def url(self) -> str:
        """Base URL for the SDK (``AsyncOpenAI(base_url=...)``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- control -----------------------------------------------------------------------

    def fail_next(
        self, n: int, kind: str, *, retry_after: float | None = 1.0, hang: float = 2.0
    ) -> None:
        """Give the next ``n`` requests fault ``kind`` (one of :data:`FAULTS`)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; use one of {FAULTS}")
        with self._lock:
            self._faults.extend(_Fault(kind, retry_after, hang) for _ in range(n))

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.requests]

    # -- lifecycle -----------------------------------------------------------------------

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self) -> FakeOpenAI:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the endpoints -------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._record(request, "/v1/chat/completions", self._respond)

    async def _embeddings(self, request: Request) -> Response:
        return await self._record(request, "/v1/embeddings", self._respond_embeddings)

    async def _record(self, request: Request, path: str, handler: _Handler) -> Response:
        """Record the request, give it the next fault and count it in flight meanwhile."""
        body = await request.json()
        record = RecordedRequest(at=time.monotonic(), body=body, path=path,
                                 content_type=request.headers.get("content-type"))
        with self._lock:
            self.requests.append(record)
            fault = self._faults.popleft() if self._faults else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        record.fault = fault.kind if fault else None
        try:
            response = await handler(body, fault)
        finally:
            with self._lock:
                self.in_flight -= 1
        record.status = response.status_code
        if path == "/v1/chat/completions" and response.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError):
                record.usage = json.loads(response.body).get("usage")
        return response

    async def _common_fault(self, fault: _Fault | None) -> Response | None:
        """Latency, then the faults both endpoints share: a 429 or 500 response, or a hang."""
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault and fault.kind == "429":
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return JSONResponse(_error("Rate limit reached", "rate_limit_exceeded"), 429, headers)
        if fault and fault.kind == "500":
            return JSONResponse(_error("The server had an error", "server_error"), 500)
        if fault and fault.kind == "hang":
            await asyncio.sleep(fault.hang)
        return None

    async def _respond(self, body: dict[str, Any], fault: _Fault | None) -> Response:
        if (failed := await self._common_fault(fault)) is not None:
            return failed
        fmt = body.get("response_format") or {}
        if self.reject_json_schema and fmt.get("type") == "json_schema":
            return _refusal(self.reject_json_schema)
        if self.reject_schema_in_json_mode and fmt.get("type") == "json_object" \
                and "schema" in fmt:
            return JSONResponse(_error(
                "Additional properties are not allowed ('schema' was unexpected)",
                "invalid_request_error", param="response_format"), 400)
        if fault and fault.kind == "invalid_json":
            content = "Sure! Here is the JSON: {not json"
        elif fault and fault.kind == "schema_invalid":
            content = json.dumps({"unexpected": "field"})
        elif self.upstream is not None:
            async with httpx.AsyncClient(base_url=self.upstream, timeout=None) as client:
                reply = await client.post("/chat/completions", json=body)
            return Response(reply.content, reply.status_code,
                            media_type=reply.headers.get("content-type"))
        else:
            content = self.responder(body)
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(content)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }],
            "usage": usage,
        })

    async def _respond_embeddings(self, body: dict[str, Any], fault: _Fault | None) -> Response:
        if (failed := await self._common_fault(fault)) is not None:
            return failed
        if fault and fault.kind == "invalid_json":
            return Response("Sure! Here are your embeddings: {not json", 200,
                            media_type="application/json")
        raw = body.get("input", [])
        inputs = [raw] if isinstance(raw, str) else [
            x if isinstance(x, str) else " ".join(map(str, x)) for x in raw]
        if not inputs or any(not x for x in inputs):
            return JSONResponse(_error("'$.input' is invalid: empty input",
                                       "invalid_request_error", param="input"), 400)
        dim = body.get("dimensions") or self.embedding_dim
        vectors = [fake_embedding(x, dim) for x in inputs]
        if fault and fault.kind == "schema_invalid":
            vectors = vectors[:-1]
        encode = body.get("encoding_format") == "base64"
        tokens = sum(_tokens(x) for x in inputs)
        return JSONResponse({
            "object": "list",
            "data": [{
                "object": "embedding", "index": i,
                "embedding": base64.b64encode(array("f", v).tobytes()).decode() if encode else v,
            } for i, v in enumerate(vectors)],
            "model": body.get("model", self.model),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })


def _error(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": kind}}
