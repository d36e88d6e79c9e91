"""docker-compose.yaml, the Dockerfile and .env.example, checked without a Docker daemon:
the Compose specification's JSON schema (check-jsonschema's vendored copy), hadolint, and
the settings the compose file reads against the ones .env.example documents."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support import REPO

BIN = Path(sys.executable).parent
COMPOSE = REPO / "docker-compose.yaml"


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def test_compose_file_follows_the_compose_specification() -> None:
    done = _run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    restart: always\n",
                                                  "    restart: [always]\n", 1))
    assert broken.read_text() != COMPOSE.read_text()
    done = _run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                str(broken))
    assert done.returncode != 0 and "restart" in done.stdout


def test_dockerfile_passes_hadolint() -> None:
    done = _run(str(BIN / "hadolint"), str(REPO / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_env_example_lists_every_setting_the_compose_file_reads() -> None:
    text = COMPOSE.read_text()
    # ${VAR}, ${VAR:-default}, ${VAR:?message}; $${VAR} is the container's own variable.
    read = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text))
    listed = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
              if re.match(r"[A-Z][A-Z0-9_]*=", line)}
    assert read, "no ${VAR} found: the pattern is wrong"
    assert read - listed == set(), "read by docker-compose.yaml, missing in .env.example"
    assert listed - read == set(), "in .env.example, never read by docker-compose.yaml"


def test_compose_keeps_the_official_airflow_layout() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = set(compose["services"])
    assert {"postgres", "redis", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
            "airflow-init"} <= services
    common = compose["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker"):
        assert compose["services"][name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == \
            "CeleryExecutor"
