"""The ``openai`` backend: the official SDK against any OpenAI-compatible endpoint.

Works with OpenAI, Azure OpenAI (its ``/openai/v1`` base URL), vLLM, Ollama and
llama.cpp's server. What it adds to a bare SDK call: the stage's pydantic model as a
strict ``json_schema`` ``response_format``, falling back for good to JSON mode when the
server refuses that shape (a 400, 422 or 5xx naming the response format): first JSON mode
with the schema alongside (``{"type": "json_object", "schema": ...}``, which llama.cpp's
servers use to constrain their output), then plain JSON mode if that is refused too, the
schema always also in the system message; a request's ``QuestionChoices`` narrow the
schema sent; validation and one repair, after which bad output is an
``invalid_output`` failure, never an exception, so it costs one item, not the task;
retries under our control (the SDK's are off; :mod:`meshdistill.llm.retrying`), where a
``Retry-After`` beyond ``max_retry_after`` ends the call as ``rate_limited`` instead of
sleeping in a worker slot; a lean request path (aiohttp transport, the body serialised
once, the reply read as bytes), because a fast server makes the client's CPU the limit;
and an ``asyncio.Semaphore`` (default 32) capping requests in flight within a task (the
Airflow pool ``llm`` caps tasks). The API key is never logged or put in a repr. Why each
piece, with measurements: ``docs/llm.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import openai
import pydantic_core
from openai import AsyncOpenAI, DefaultAioHttpClient
from pydantic import ValidationError

from meshdistill.errors import ConfigError
from meshdistill.llm.backend import FailureKind, LLMRequest, LLMResult, T
from meshdistill.llm.config import DEFAULT_CONCURRENCY, OPENAI_API_URL
from meshdistill.llm.retrying import RetryPolicy, refuses_response_format
from meshdistill.llm.retrying import retry_after_seconds as retry_after_seconds
from meshdistill.llm.schemas import grammar_schema, output_schema

log = logging.getLogger(__name__)

TRANSPORTS = ("aiohttp", "httpx")  # the SDK's aiohttp transport, or its default httpx
RESPONSE_FORMATS = ("json_schema", "json_object+schema", "json_object")
"""The shapes tried in order; a server that refuses one gets the next from then on."""


class _RetryAfterTooLong(Exception):
    """The server asked us to wait longer than we are willing to."""

    def __init__(self, seconds: float, cause: openai.APIStatusError) -> None:
        super().__init__(f"Retry-After {seconds:g}s exceeds the cap")
        self.seconds = seconds
        self.cause = cause


@dataclass
class _Reply:
    text: str | None
    refusal: str | None
    tokens_in: int
    tokens_out: int
    finish_reason: str | None


def _reply_of(content: bytes) -> _Reply:
    """The parts of a chat completion we use, read from its JSON.

    A body that is not JSON becomes a reply whose text is that body, and JSON that is not
    a chat completion a reply with no text: either then fails validation (and is stored
    as the failure's raw text) like any other unusable output, rather than raising.
    """
    try:
        data = json.loads(content)
    except ValueError:
        return _Reply(content.decode("utf-8", "replace")[:2000], None, 0, 0, None)
    if not isinstance(data, dict):
        data = {}
    choices = data.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict):
        choice = {}
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    return _Reply(
        text=message.get("content"), refusal=message.get("refusal"),
        tokens_in=int(usage.get("prompt_tokens") or 0),
        tokens_out=int(usage.get("completion_tokens") or 0),
        finish_reason=choice.get("finish_reason"),
    )


def _refused(exc: BaseException) -> bool:
    """A connection the server refused or reset, under whatever the transport called it.

    The aiohttp transport reports a refused connection as a connect *timeout*; the
    ``ConnectionError`` underneath says what happened.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _failure_of(exc: BaseException) -> tuple[FailureKind, str]:
    if isinstance(exc, _RetryAfterTooLong):
        return FailureKind.RATE_LIMITED, f"429 with Retry-After {exc.seconds:g}s beyond the cap"
    if isinstance(exc, openai.APITimeoutError) and not _refused(exc):
        return FailureKind.TIMEOUT, "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return FailureKind.CONNECTION, f"connection error: {exc}"
    if isinstance(exc, openai.APIStatusError):
        detail = f"HTTP {exc.status_code}: {exc.message}"[:500]
        if exc.status_code == 429:
            return FailureKind.RATE_LIMITED, detail
        if exc.status_code >= 500:
            return FailureKind.SERVER_ERROR, detail
        return FailureKind.REQUEST_REJECTED, detail
    return FailureKind.CONNECTION, f"{type(exc).__name__}: {exc}"[:500]


def _json_mode_instruction(schema: dict[str, Any]) -> str:
    return (
        "\n\nReply with one JSON object and nothing else. It must validate against this "
        f"JSON Schema:\n{json.dumps(schema, separators=(',', ':'))}"
    )


def _narrowed(request: LLMRequest[Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` narrowed to the request's input when it carries choices (the system
    message of JSON mode keeps the general schema: the choices are in the prompt already)."""
    return schema if request.choices is None else request.choices.narrow(schema)


def _strip_fences(text: str) -> str:
    """Some servers in JSON mode still wrap the object in a Markdown code fence."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return stripped.strip()


class OpenAIBackend:
    """OpenAI-compatible chat completions with validation, repair, retries and a cap.

    One instance can serve many ``asyncio.run`` calls (an Airflow task may make several):
    the SDK client and the semaphore belong to an event loop and are recreated when the
    running loop changes.
    """

    name = "openai"

    def __init__(
        self,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        organization: str | None = None,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = 60.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        structured_outputs: bool = True,
        repair: bool = True,
        transport: str = "aiohttp",
    ) -> None:
        resolved_model = model or os.environ.get("MESHDISTILL_LLM_MODEL")
        if not resolved_model:
            raise ConfigError("no LLM model: pass model= or set MESHDISTILL_LLM_MODEL")
        if transport not in TRANSPORTS:
            raise ConfigError(f"unknown HTTP transport {transport!r}; use one of {TRANSPORTS}")
        if max_concurrency < 1 or max_attempts < 1:
            raise ConfigError("max_concurrency and max_attempts must be at least 1")
        self.model = resolved_model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        # Local servers (vLLM, Ollama, llama.cpp) accept any key; the SDK insists on one.
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or "unused"
        self.organization = organization or os.environ.get("OPENAI_ORG_ID") or None
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.repair = repair
        self._format = 0 if structured_outputs else 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self.transport = transport

    def __repr__(self) -> str:  # never the key
        return (f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
                f"max_concurrency={self.max_concurrency}, "
                f"response_format={self.response_format!r})")

    @property
    def structured_outputs(self) -> bool:
        """False once the server has refused ``json_schema``: JSON mode from then on."""
        return self._format == 0

    @property
    def response_format(self) -> str:
        """The shape requests are sent in now (one of :data:`RESPONSE_FORMATS`)."""
        return RESPONSE_FORMATS[self._format]

    def _state(self) -> tuple[AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._semaphore is None or self._loop is not loop:
            extra: dict[str, Any] = {}
            if self.transport == "aiohttp":
                extra["http_client"] = DefaultAioHttpClient()
            self._client = AsyncOpenAI(
                api_key=self._api_key, base_url=self.base_url or OPENAI_API_URL,
                organization=self.organization,
                timeout=self.timeout, max_retries=0, **extra,
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        return self._client, self._semaphore

    async def aclose(self) -> None:
        """Close the HTTP client of the current loop (connections are pooled)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = self._semaphore = self._loop = None

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- one HTTP exchange, with retries ---------------------------------------------------

    @property
    def retry_policy(self) -> RetryPolicy:
        """Attempts, backoff and Retry-After cap (:mod:`meshdistill.llm.retrying`)."""
        return RetryPolicy(self.max_attempts, self.backoff_initial, self.backoff_max,
                           self.max_retry_after)

    async def _send(
        self, body: dict[str, Any], counter: list[int]
    ) -> _Reply:
        client, semaphore = self._state()
        # Serialised once, by pydantic-core (Rust; already ours through pydantic), and
        # passed as the request's ``content`` (the SDK's parameter for a body it sends as
        # it is, under the client's default ``Content-Type: application/json``): the SDK
        # then neither copies the messages for every attempt nor encodes them with the
        # stdlib json encoder. Same JSON document.
        payload = pydantic_core.to_json(body)

        async def attempt() -> bytes:
            counter[0] += 1
            async with semaphore:
                # client.post with cast_to=bytes (the SDK's documented way to call an
                # endpoint its typed methods do not describe) instead of
                # chat.completions.create: the same request, auth, base URL, timeout and
                # error mapping (non-2xx raises APIStatusError), without the SDK's
                # type-driven transformation of our already-plain JSON body and without
                # building a ChatCompletion model of the reply, which saves 0.35 ms of
                # event-loop CPU per request, a third of the SDK's share, on the bench.
                return await client.post("/chat/completions", content=payload, cast_to=bytes)

        # A Retry-After beyond the cap ends the call as rate_limited (see _failure_of).
        # The policy's own loop rather than a tenacity object per request (same attempts
        # and waits; see RetryPolicy.call).
        return _reply_of(await self.retry_policy.call(attempt, too_long=_RetryAfterTooLong))

    def _body(
        self, request: LLMRequest[T], messages: list[dict[str, str]], shape: str
    ) -> dict[str, Any]:
        schema = output_schema(request.output_model)
        if shape == "json_schema":
            response_format: dict[str, Any] = {"type": "json_schema", "json_schema": {
                "name": request.output_model.__name__,
                "schema": _narrowed(request, schema), "strict": True}}
        else:
            response_format = {"type": "json_object"}
            if shape == "json_object+schema":
                response_format["schema"] = _narrowed(
                    request, grammar_schema(request.output_model))
            messages = [dict(m) for m in messages]
            system = next((m for m in messages if m["role"] == "system"), None)
            if system is None:
                messages.insert(0, {"role": "system", "content": ""})
                system = messages[0]
            system["content"] += _json_mode_instruction(schema)
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "response_format": response_format,
            "temperature": request.params.temperature, "max_tokens": request.params.max_tokens,
        }
        if request.params.seed is not None:
            body["seed"] = request.params.seed
        return body

    async def _exchange(
        self, request: LLMRequest[T], messages: list[dict[str, str]], result: LLMResult[T],
        counter: list[int],
    ) -> _Reply:
        """One logical call in the current shape, moving down :data:`RESPONSE_FORMATS`
        for good when the server refuses a shape; the last shape's errors are the call's."""
        while True:
            shape = RESPONSE_FORMATS[self._format]
            try:
                reply = await self._send(self._body(request, messages, shape), counter)
            except openai.APIStatusError as exc:
                if shape == RESPONSE_FORMATS[-1] or not refuses_response_format(exc):
                    raise
                if RESPONSE_FORMATS[self._format] == shape:  # first to see it says so
                    self._format += 1
                    log.info("%s refused response_format %s (HTTP %s); sending %s from now on",
                             self.base_url, shape, exc.status_code, self.response_format)
                continue
            result.response_format = "json_schema" if shape == "json_schema" else "json_object"
            return reply

    # -- the interface ----------------------------------------------------------------------

    async def complete(self, request: LLMRequest[T]) -> LLMResult[T]:
        """Run ``request``; every failure ends in the result, not in an exception."""
        start = time.perf_counter()
        result: LLMResult[T] = LLMResult.for_request(request, self.name, self.model)
        counter = [0]
        messages: list[dict[str, str]] = [
            {"role": m["role"], "content": m["content"]} for m in request.messages]
        rounds = 2 if self.repair else 1
        try:
            for round_no in range(rounds):
                reply = await self._exchange(request, messages, result, counter)
                result.tokens_in += reply.tokens_in
                result.tokens_out += reply.tokens_out
                result.raw_text = reply.text
                if reply.refusal:
                    result.failure, result.error = FailureKind.REFUSED, reply.refusal[:2000]
                    break
                try:
                    result.output = request.output_model.model_validate_json(
                        _strip_fences(reply.text or ""))
                    result.failure = result.error = None
                    result.repaired = round_no > 0
                    break
                except ValidationError as exc:
                    result.failure = FailureKind.INVALID_OUTPUT
                    result.error = _describe(exc, reply.finish_reason)
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply.text or ""},
                    {"role": "user", "content": (
                        "Your reply did not validate against the required JSON schema:\n"
                        f"{result.error}\nReply again with only the corrected JSON object.")},
                ]
        except (openai.APIError, _RetryAfterTooLong) as exc:
            result.failure, result.error = _failure_of(exc)
        result.attempts = counter[0]
        result.latency_ms = (time.perf_counter() - start) * 1000
        if result.failure is not None:
            log.debug("llm %s failed (%s) after %d attempts: %s", request.stage,
                      result.failure, result.attempts, (result.error or "")[:200])
        return result


def _describe(exc: ValidationError, finish_reason: str | None) -> str:
    """A compact validation error a model can act on (and a person can read in the DB)."""
    lines = []
    for err in exc.errors(include_url=False)[:10]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"- {where}: {err['msg']}")
    if finish_reason == "length":
        lines.append("- the reply was cut off at max_tokens")
    return "\n".join(lines)
