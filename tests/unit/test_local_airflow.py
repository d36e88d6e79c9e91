"""``make up`` / ``make down``'s process handling, on real processes (no Airflow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshdistill.config import Settings
from meshdistill_airflow import local


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _instance(tmp_path: Path, **kw: object) -> local.LocalAirflow:
    return local.LocalAirflow(home=tmp_path / "airflow", repo=tmp_path, **kw)  # type: ignore[arg-type]


def _record(la: local.LocalAirflow, procs: dict[str, dict[str, object]], **info: object) -> None:
    la.state.mkdir(parents=True, exist_ok=True)
    (la.state / "pids.json").write_text(json.dumps(procs))
    (la.state / "instance.json").write_text(json.dumps(info))


def test_start_time_names_one_live_process(sleeper: subprocess.Popen[bytes]) -> None:
    assert local._start_time(os.getpid()) is not None
    assert local._start_time(sleeper.pid) is not None
    done = subprocess.Popen(["true"])
    while local._start_time(done.pid) is not None:  # exited, not yet reaped: a zombie
        time.sleep(0.05)
    assert done.poll() == 0 and local._start_time(done.pid) is None


def test_down_stops_what_up_recorded_and_spares_a_reused_pid(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    la = _instance(tmp_path)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        _record(la, {"scheduler": {"pid": sleeper.pid, "start": local._start_time(sleeper.pid)},
                     # the pid of another process now: another start time
                     "triggerer": {"pid": other.pid, "start": "1"}},
                url=la.url, executor="local")
        assert local.down(la, Settings.from_env(), timeout=10) == ["scheduler"]
        assert sleeper.wait(timeout=10) == -15  # SIGTERM
        assert other.poll() is None  # left alone
        assert not (la.state / "pids.json").exists()
    finally:
        other.kill()
        other.wait()


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        la = _instance(tmp_path, port=held.getsockname()[1])
        with pytest.raises(RuntimeError, match=f"port {la.port} is taken"):
            local.up(la, Settings.from_env())
    assert not (la.state / "pids.json").exists()


def test_up_refuses_to_mix_with_a_running_instance_of_another_executor(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    la = _instance(tmp_path, executor="celery")
    _record(la, {"scheduler": {"pid": sleeper.pid, "start": local._start_time(sleeper.pid)}},
            url=la.url, executor="local")
    with pytest.raises(RuntimeError, match=r"already runs .* with the local executor"):
        local.up(la, Settings.from_env())


def test_up_refuses_celery_without_a_broker(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    la = _instance(tmp_path, executor="celery", port=port)
    with pytest.raises(RuntimeError, match="no Celery broker answers"):
        local.up(la, Settings.from_env(), extra_env={
            "MESHDISTILL_CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0"})
