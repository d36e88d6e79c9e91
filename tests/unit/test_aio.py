"""The event loop distillation runs on: uvloop by default, the stdlib loop on request."""

from __future__ import annotations

import asyncio
import gc
import weakref

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


def test_gc_frozen_hides_what_exists_for_the_block_and_then_restores_the_collector() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with aio.gc_frozen():
        assert gc.get_freeze_count() > 1000  # the modules, at least
        assert gc.get_threshold() == aio.GC_THRESHOLDS
        cycle: list[object] = []
        cycle.append(cycle)  # made inside the block: still collectable
        ref = weakref.ref(_Node(cycle))
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_gc_frozen_restores_the_collector_when_the_block_raises() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), aio.gc_frozen():
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


class _Node:
    """A weak-referenceable object in a reference cycle."""

    def __init__(self, payload: list[object]) -> None:
        self.payload = payload
        self.me = self


def test_overlapping_gc_frozen_blocks_restore_the_collector_at_the_last_exit() -> None:
    before = gc.get_threshold()
    first, second = aio.gc_frozen(), aio.gc_frozen()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the other block still runs: still quiet
    assert gc.get_threshold() == aio.GC_THRESHOLDS and gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
