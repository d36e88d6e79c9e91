"""The ``openai`` backend with its HTTP client in a child process of its own.

Why: a distillation run's event loop also renders prompts, grades contexts and waits for
the GIL behind worker threads, and a reply that has arrived waits behind that work before
it releases its concurrency slot. In a process that does nothing but HTTP, a slot is
released as soon as its reply is read; the parent only keeps the child's queue from
running dry. The child runs the ordinary :class:`~meshdistill.llm.openai_backend.OpenAIBackend`
(same structured outputs, repair, retries, timeouts and cap) and validates output there.
Wire: a ``socket.socketpair``, frames of a 4-byte length and a pickle (both ends are this
package, same version, same machine). The child starts as ``python -m
meshdistill.llm.client_process FD``; its settings, the API key included, arrive in the
first frame, never in argv or the environment, and its log records come back to the
parent's loggers. A dead child fails the calls it held as ``connection`` failures and the
next call starts another, up to :data:`MAX_STARTS_UNANSWERED`. Details: ``docs/llm.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshdistill import aio
from meshdistill.llm.backend import FailureKind, LLMRequest, LLMResult, T
from meshdistill.llm.openai_backend import OpenAIBackend

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
# Children that may end in a row, none of them having answered a call, before calls fail
# at once instead of starting another (a child that cannot start must not be respawned
# for every one of thousands of calls).
MAX_STARTS_UNANSWERED = 3
_LOG_FIELDS = ("name", "levelno", "levelname", "pathname", "filename", "module", "lineno",
               "funcName", "created", "msecs", "relativeCreated", "process", "processName",
               "thread", "threadName", "taskName")


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


class _ChildGone(Exception):
    """The child exited (or its socket broke) before it answered."""


# -- the parent's side ---------------------------------------------------------------------


@dataclass
class _Link:
    """One running child and the calls waiting for it (one per event loop)."""

    proc: subprocess.Popen[bytes]
    writer: asyncio.StreamWriter
    loop: asyncio.AbstractEventLoop
    pending: dict[int, asyncio.Future[LLMResult[Any]]] = field(default_factory=dict)
    reader_task: asyncio.Task[None] | None = None
    closed: bool = False
    answered: bool = False  # it has sent at least one result
    # set when the child has imported everything and built its client (or has ended)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, message: Any) -> None:
        if not self.closed:
            self.writer.write(_frame(message))


class ClientProcessBackend:
    """:class:`OpenAIBackend` (same arguments) running in a child process; see the module
    docstring. Implements :class:`~meshdistill.llm.backend.LLMBackend`.

    The child starts on the first call in an event loop, or earlier with :meth:`start`,
    and stops on :meth:`aclose` (or when the parent's end of the socket closes, so it
    never outlives the parent).
    """

    name = "openai"

    def __init__(self, **openai_kwargs: Any) -> None:
        # Resolved here (model, URL and key from the environment; argument errors are a
        # ConfigError in the caller, not in the child), then passed to the child as they are.
        local = OpenAIBackend(**openai_kwargs)
        self.model = local.model
        self.base_url = local.base_url
        self.max_concurrency = local.max_concurrency
        self._structured = local.structured_outputs
        self._kwargs = {**openai_kwargs, "model": local.model, "base_url": local.base_url,
                        "api_key": local._api_key, "organization": local.organization}
        self._ids = itertools.count()
        self._link: _Link | None = None
        self._starting: asyncio.Task[_Link] | None = None
        self._unanswered_starts = 0  # children started in a row that answered nothing
        self.python = sys.executable  # the interpreter the child runs on

    def __repr__(self) -> str:  # never the key
        return (f"ClientProcessBackend(model={self.model!r}, base_url={self.base_url!r}, "
                f"max_concurrency={self.max_concurrency})")

    @property
    def structured_outputs(self) -> bool:
        """False once the server has rejected ``json_schema`` (seen in a result)."""
        return self._structured

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first call or after close)."""
        link = self._link
        return link.proc.pid if link is not None and not link.closed else None

    # -- lifecycle ---------------------------------------------------------------------

    async def _current(self) -> _Link:
        """This loop's live child, started (once, however many calls ask) if need be."""
        loop = asyncio.get_running_loop()
        link = self._link
        if link is not None and link.loop is loop and not link.closed:
            return link
        starting = self._starting
        if starting is None or starting.get_loop() is not loop or starting.done():
            if self._unanswered_starts >= MAX_STARTS_UNANSWERED:
                raise _ChildGone(f"the LLM client process ended {self._unanswered_starts} "
                                 "times in a row without answering (its error is above, "
                                 "on stderr); not starting another")
            starting = self._starting = loop.create_task(self._start(loop))
        return await asyncio.shield(starting)

    async def _start(self, loop: asyncio.AbstractEventLoop) -> _Link:
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding meshdistill
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "meshdistill.llm.client_process",
                 str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        reader, writer = await asyncio.open_connection(sock=parent_end)
        link = _Link(proc, writer, loop)
        level = logging.getLogger("meshdistill").getEffectiveLevel()
        link.send(("config", self._kwargs, level))
        link.reader_task = loop.create_task(self._receive(link, reader))
        self._link = link
        log.debug("LLM client process %d started", proc.pid)
        return link

    async def start(self) -> None:
        """Start this loop's child now and return once it is ready to send requests.

        Why: starting Python and importing the SDK takes the child most of a second on a
        small machine; a run calls this while it prepares (index refresh, grader), so its
        first requests do not wait for that. A child that cannot start is not an error
        here: the calls then fail as they would without this (see the module docstring).
        """
        try:
            link = await self._current()
        except (_ChildGone, OSError) as exc:
            log.debug("LLM client process did not start: %s", exc)
            return
        await link.ready.wait()

    async def aclose(self) -> None:
        """Stop the child of the current loop; calls still waiting end as failures."""
        link, self._link, self._starting = self._link, None, None
        if link is None or link.loop is not asyncio.get_running_loop():
            return
        if not link.closed:
            link.send(("close",))
            with contextlib.suppress(ConnectionError):
                await link.writer.drain()
        if link.reader_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(link.reader_task), 10)
            except TimeoutError:
                link.proc.kill()
        link.writer.close()
        self._unanswered_starts = 0  # closed on purpose: no evidence against the next child
        try:
            await asyncio.to_thread(link.proc.wait, 10)
        except subprocess.TimeoutExpired:
            link.proc.kill()
            await asyncio.to_thread(link.proc.wait)

    async def __aenter__(self) -> ClientProcessBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _receive(self, link: _Link, reader: asyncio.StreamReader) -> None:
        """Route the child's frames until its socket ends, then fail what is left."""
        why = "closed"
        try:
            while True:
                message = await _read(reader)
                kind = message[0]
                if kind == "result":
                    if not link.answered:
                        link.answered, self._unanswered_starts = True, 0
                    future = link.pending.get(message[1])
                    if future is not None and not future.done():
                        future.set_result(message[2])
                elif kind == "error":
                    future = link.pending.get(message[1])
                    if future is not None and not future.done():
                        future.set_exception(RuntimeError(
                            f"LLM client process: {message[2]}"))
                elif kind == "ready":
                    link.ready.set()
                elif kind == "log":  # as if logged here: the parent's levels decide
                    record = logging.makeLogRecord(message[1])
                    logger = logging.getLogger(record.name)
                    if logger.isEnabledFor(record.levelno):
                        logger.handle(record)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            why = type(exc).__name__
        finally:
            link.closed = True
            link.ready.set()  # nothing to wait for any more
            if not link.answered:
                self._unanswered_starts += 1
            code = link.proc.poll()
            gone = _ChildGone(f"LLM client process {link.proc.pid} ended "
                              f"({'exit code ' + str(code) if code is not None else why})")
            for future in link.pending.values():
                if not future.done():
                    future.set_exception(gone)
            if link.pending:
                log.warning("%s with %d calls unanswered", gone, len(link.pending))

    # -- the interface -----------------------------------------------------------------

    async def complete(self, request: LLMRequest[T]) -> LLMResult[T]:
        """Send ``request`` to the child and wait for its result."""
        try:
            link = await self._current()
        except _ChildGone as exc:
            return self._failed(request, str(exc))
        except OSError as exc:  # ConnectionError included
            return self._failed(request, f"cannot start the LLM client process: {exc}")
        if link.closed:  # it died after starting; the next call starts another
            return self._failed(request, f"LLM client process {link.proc.pid} ended")
        call_id = next(self._ids)
        future: asyncio.Future[LLMResult[Any]] = link.loop.create_future()
        link.pending[call_id] = future
        # The prompt's structured inputs are for the offline backend; the child only
        # needs the messages, so they stay here (less to pickle).
        link.send(("call", call_id, replace(request, inputs=None)))
        try:
            result: LLMResult[T] = await future
        except _ChildGone as exc:
            return self._failed(request, str(exc))
        except asyncio.CancelledError:
            link.send(("cancel", call_id))
            raise
        finally:
            link.pending.pop(call_id, None)
        if result.response_format == "json_object":
            self._structured = False
        return result

    def _failed(self, request: LLMRequest[T], error: str) -> LLMResult[T]:
        return LLMResult.for_request(request, self.name, self.model,
                                     failure=FailureKind.CONNECTION, error=error)


# -- the child's side ----------------------------------------------------------------------


class _ForwardLogs(logging.Handler):
    """Log records as frames to the parent (message formatted here; args may not pickle)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: getattr(record, k, None) for k in _LOG_FIELDS}
            fields["msg"], fields["args"] = record.getMessage(), None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            self._writer.write(_frame(("log", fields)))
        except Exception:
            self.handleError(record)


def _forget(calls: dict[int, Any], call_id: int, _: object) -> None:
    calls.pop(call_id, None)


async def _serve(fd: int) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    kind, kwargs, level = await _read(reader)
    assert kind == "config"
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(writer)]
    root.setLevel(level)
    backend = OpenAIBackend(**kwargs)
    calls: dict[int, asyncio.Task[None]] = {}
    # Everything imported so far (the SDK, pydantic, aiohttp: some 130,000 objects) lives
    # as long as the process: out of the collector's sight, so that a full collection
    # does not stop this loop, and with it every reply waiting to release its slot, for
    # 50–170 ms (measured on the bench: the child's longest stalls).
    aio.quiet_gc()
    writer.write(_frame(("ready",)))

    async def call(call_id: int, request: LLMRequest[Any]) -> None:
        try:
            message: Any = ("result", call_id, await backend.complete(request))
        except Exception as exc:  # a bug, not a server failure: the parent raises it
            message = ("error", call_id, f"{type(exc).__name__}: {exc}")
        writer.write(_frame(message))

    try:
        while True:
            try:
                message = await _read(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the parent is gone
            if message[0] == "call":
                call_id: int = message[1]
                calls[call_id] = asyncio.ensure_future(call(call_id, message[2]))
                calls[call_id].add_done_callback(functools.partial(_forget, calls, call_id))
            elif message[0] == "cancel":
                running = calls.get(message[1])
                if running is not None:
                    running.cancel()
            elif message[0] == "close":
                break
    finally:
        for running in list(calls.values()):
            running.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
        await backend.aclose()
        writer.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the child: ``python -m meshdistill.llm.client_process FD``."""
    args = sys.argv[1:] if argv is None else argv
    aio.run(_serve(int(args[0])))


if __name__ == "__main__":
    main()
