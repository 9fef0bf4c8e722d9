"""Every registry-side command, run as the installed `diredi`, through each way its set-up can be wrong:
one line that says what and what to do, its exit code, and no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

DIREDI = str(Path(sys.executable).parent / "diredi")
SCENARIO = str(Path(__file__).parents[3] / "scenarios" / "digits-two-users.json")

COMMANDS = {
    "apikey create": ["apikey", "create", "--role", "admin"],
    "keys status": ["keys", "status"],
    "telemetry prune": ["telemetry", "prune"],
    "db current": ["db", "current"],
    "line create": ["line", "create", "--cohort", "kitchen", "--scenario", SCENARIO],
    "api": ["api", "--port", "{closed}"],
    "worker": ["worker", "--metrics-port", "0"],
    "ingest": ["ingest", "--metrics-port", "0"],
}
# failure → (the settings that cause it, what the line says, the exit code)
FAILURES = {
    "unmigrated registry": ({}, "not migrated to the newest revision: run `diredi db upgrade`", 2),
    "unreachable database": (
        {"DIREDI_DATABASE_URL": "postgresql://diredi:x@127.0.0.1:{closed}/diredi"},
        "the registry's database is unreachable: connection to server at",
        3,
    ),
    "database URL of another kind": (
        {"DIREDI_DATABASE_URL": "mysql://diredi@127.0.0.1/diredi"},
        "database_url must be a sqlite:// or postgresql:// URL",
        2,
    ),
}
# `db current` reads whatever revision is there, unmigrated included.
EXPECTED_TO_WORK = {("db current", "unmigrated registry")}


@dataclass(frozen=True)
class Outcome:
    code: int
    stderr: str
    stdout: str


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on, held (bound, never listening) so that no other test takes it
    meanwhile: connecting to it is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Outcome]]:
    """Every command through every failure, four at a time (each is a fresh `diredi` process)."""

    def run(command: str, failure: str, closed: int) -> Outcome:
        settings, _, _ = FAILURES[failure]
        data_dir = tmp_path_factory.mktemp("data")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(data_dir),
            "DIREDI_DATA_DIR": str(data_dir),
            "DIREDI_MQTT_URL": f"mqtt://diredi-cloud:secret@127.0.0.1:{closed}",
            **{name: value.format(closed=closed) for name, value in settings.items()},
        }
        done = subprocess.run(  # noqa: S603
            [DIREDI, *(arg.format(closed=closed) for arg in COMMANDS[command])],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        return Outcome(done.returncode, done.stderr, done.stdout)

    cases = [(command, failure) for command in COMMANDS for failure in FAILURES]
    with closed_port() as closed, ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(cases, pool.map(lambda case: run(case[0], case[1], closed), cases), strict=True))
    yield results


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_fails_in_one_line_with_its_exit_code(
    outcomes: dict[tuple[str, str], Outcome], command: str, failure: str
) -> None:
    outcome = outcomes[command, failure]
    _, says, code = FAILURES[failure]
    if (command, failure) in EXPECTED_TO_WORK:
        assert outcome.code == 0, outcome.stderr
        return

    lines = [line for line in outcome.stderr.splitlines() if line.strip()]

    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert outcome.code == code, outcome.stderr
    assert lines and lines[-1].startswith("error: "), outcome.stderr
    assert says in lines[-1], outcome.stderr


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    # Prepare: a migrated registry, and the API's port taken
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DIREDI_DATA_DIR": str(tmp_path)}
    subprocess.run([DIREDI, "db", "upgrade"], env=env, capture_output=True, check=True, timeout=120)  # noqa: S603
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # Execute
        done = subprocess.run(  # noqa: S603
            [DIREDI, "api", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    # Assert
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "address already in use" in done.stderr
