"""The event loop distillation runs on: uvloop by default, the stdlib loop on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from meshdistill import aio
from meshdistill.errors import ConfigError


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHDISTILL_EVENT_LOOP", raising=False)
    assert aio.run(_loop_type()) is uvloop.Loop


def test_the_stdlib_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHDISTILL_EVENT_LOOP", "asyncio")
    loop_type = aio.run(_loop_type())
    assert loop_type is not uvloop.Loop
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_an_unknown_loop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHDISTILL_EVENT_LOOP", "trio")
    with pytest.raises(ConfigError, match="MESHDISTILL_EVENT_LOOP"):
        aio.loop_factory()


def test_run_returns_the_result_and_raises_the_error() -> None:
    async def boom() -> None:
        raise ValueError("inside")

    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    assert aio.run(value()) == 7
    with pytest.raises(ValueError, match="inside"):
        aio.run(boom())
