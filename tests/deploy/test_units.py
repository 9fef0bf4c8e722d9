"""The production units under deploy/systemd and deploy/diredi.env.example: systemd accepts them, they are
hardened, and what they run exists; the env example stops every service until it is filled in."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ENV_EXAMPLE = ROOT / "deploy" / "diredi.env.example"
DIREDI = Path(sys.executable).parent / "diredi"
INSTALLED = "/opt/diredi/bin/diredi"  # where the units expect the venv's `diredi` (docs/deploy.md)
# The unit files, and the instance of each that systemd-analyze checks.
SERVICES = {
    "diredi-api.service": "diredi-api.service",
    "diredi-ingest@.service": "diredi-ingest@a.service",
    "diredi-worker.service": "diredi-worker.service",
    "diredi-beat.service": "diredi-beat.service",
}
CONFIG_ERROR = "2"  # what the CLI exits with on a wrong setting (cloud/cli/ops.py `_fail`, `_settings`)
HARDENING = {
    "User": "diredi",
    "Group": "diredi",
    "EnvironmentFile": "/etc/diredi/diredi.env",
    "StateDirectory": "diredi",
    "ReadWritePaths": "/var/lib/diredi",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "CapabilityBoundingSet": "",
    "Restart": "on-failure",
    "RestartPreventExitStatus": CONFIG_ERROR,
}
EXPOSURE_THRESHOLD = 20  # `systemd-analyze security` on its 0-100 scale: 2.0; the device unit scores 3.2


def needs(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} is not installed here")
    return found


def directives(text: str) -> dict[str, list[str]]:
    """A unit file's directives, each with every value it is given (systemd allows repeats)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def runnable_copy(name: str, directory: Path, text: str | None = None) -> Path:
    """The unit as installed, but running this checkout's `diredi`, written into `directory` under the
    name of the instance systemd-analyze is to check (a template checks as its instance)."""
    text = (UNITS / name).read_text() if text is None else text
    (directory / name).write_text(text.replace(INSTALLED, str(DIREDI)))
    return directory / SERVICES[name]


def verify(unit: Path) -> list[str]:
    """What `systemd-analyze verify` finds wrong with `unit`: its complaints about this unit, and the
    exit status when not 0. Unknown directives and bad values are only warned about."""
    done = subprocess.run(  # noqa: S603
        [needs("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    stem = unit.name.split("@")[0].removesuffix(".service")
    problems = [line for line in (done.stdout + done.stderr).splitlines() if stem in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    return problems


def exposure_over(unit: Path, threshold: int) -> bool:
    done = subprocess.run(  # noqa: S603
        [needs("systemd-analyze"), "security", "--offline=yes", f"--threshold={threshold}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode != 0


@pytest.mark.parametrize("name", SERVICES)
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    # Prepare
    unit = runnable_copy(name, tmp_path)

    # Execute
    problems = verify(unit)

    # Assert
    assert problems == []


BREAKAGES = {
    "an unknown directive": lambda text: text.replace("[Service]\n", "[Service]\nProtectEverything=yes\n"),
    "a value systemd does not know": lambda text: text.replace("Restart=on-failure", "Restart=sometimes"),
    "a binary that is not there": lambda text: text.replace(INSTALLED, "/nonexistent/diredi"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_unit_fails_the_check(breakage: str, tmp_path: Path) -> None:
    # Prepare
    broken = BREAKAGES[breakage]((UNITS / "diredi-ingest@.service").read_text())
    unit = runnable_copy("diredi-ingest@.service", tmp_path, broken)

    # Execute
    problems = verify(unit)

    # Assert
    assert problems, f"systemd-analyze verify did not notice {breakage}"


@pytest.mark.parametrize("name", SERVICES)
def test_the_unit_is_hardened(name: str, tmp_path: Path) -> None:
    # Prepare
    found = directives((UNITS / name).read_text())
    unit = runnable_copy(name, tmp_path)

    # Execute
    over = exposure_over(unit, EXPOSURE_THRESHOLD)

    # Assert
    for key, value in HARDENING.items():
        assert value in found.get(key, []), f"{name}: {key}={value} missing (has {found.get(key)})"
    assert "~@privileged" in found["SystemCallFilter"]
    after = " ".join(found["After"]).split()
    for dependency in ("network-online.target", "postgresql.service", "mosquitto.service"):
        assert dependency in after, f"{name} is not ordered after {dependency}"
    assert not over, f"{name}: exposure above {EXPOSURE_THRESHOLD / 10}"


def test_a_unit_without_its_hardening_is_over_the_exposure_threshold(tmp_path: Path) -> None:
    # Prepare: the API's unit with every hardening directive removed
    text = (UNITS / "diredi-api.service").read_text()
    kept = [line for line in text.splitlines() if line.split("=", 1)[0] not in HARDENING or "=" not in line]
    unit = runnable_copy("diredi-api.service", tmp_path, "\n".join(kept) + "\n")

    # Execute
    over = exposure_over(unit, EXPOSURE_THRESHOLD)

    # Assert
    assert over


def test_exactly_one_unit_sends_the_periodic_tasks() -> None:
    beats = [
        name
        for name in SERVICES
        if "--beat" in shlex.split(directives((UNITS / name).read_text())["ExecStart"][0])
    ]
    assert beats == ["diredi-beat.service"]


@pytest.mark.parametrize("name", SERVICES)
def test_what_the_unit_runs_exists_with_its_options(name: str) -> None:
    # Prepare
    argv = shlex.split(directives((UNITS / name).read_text())["ExecStart"][0])

    # Execute
    done = subprocess.run(  # noqa: S603
        [str(DIREDI), argv[1], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )

    # Assert
    assert argv[0] == INSTALLED
    assert done.returncode == 0, done.stderr
    for option in (arg.split("=")[0] for arg in argv[2:] if arg.startswith("--")):
        assert option in done.stdout, f"{name}: `diredi {argv[1]}` has no {option}"


def example_values() -> dict[str, str]:
    """deploy/diredi.env.example's settings, as systemd's EnvironmentFile= reads them."""
    return dict(re.findall(r"^(DIREDI_\w+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))


def test_the_env_example_names_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    named = set(re.findall(r"^(?:# )?(DIREDI_\w+)=", text, re.MULTILINE))
    assert named == {f"DIREDI_{field.upper()}" for field in Settings.model_fields}
    assert set(example_values()) >= {"DIREDI_DATABASE_URL", "DIREDI_REDIS_URL", "DIREDI_MQTT_URL"}


def test_the_env_examples_placeholders_are_refused_and_real_values_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the example as a file of settings, and the same with its placeholders filled in
    from broker.client import BrokerTarget
    from broker.exceptions import BrokerURLError

    for name in [k for k in os.environ if k.startswith("DIREDI_")]:
        monkeypatch.delenv(name)
    values = example_values()
    filled = tmp_path / "filled.env"
    filled.write_text(
        ENV_EXAMPLE.read_text()
        .replace(
            "DIREDI_DATABASE_URL=CHANGE-ME", "DIREDI_DATABASE_URL=postgresql://diredi:s3cret@127.0.0.1/diredi"
        )
        .replace("DIREDI_MQTT_URL=CHANGE-ME", "DIREDI_MQTT_URL=mqtt://diredi-cloud:s3cret@127.0.0.1:1883")
        .replace(
            "DIREDI_MQTT_ADMIN_URL=CHANGE-ME", "DIREDI_MQTT_ADMIN_URL=mqtt://admin:s3cret@127.0.0.1:1883"
        )
    )

    # Execute / Assert
    with pytest.raises(ValidationError, match="database_url"):
        Settings(_env_file=ENV_EXAMPLE)
    for name in ("DIREDI_MQTT_URL", "DIREDI_MQTT_ADMIN_URL"):
        with pytest.raises(BrokerURLError):
            BrokerTarget.parse(values[name])
    ready = Settings(_env_file=filled)
    assert not re.search(r"^DIREDI_\w+=CHANGE-ME", filled.read_text(), re.MULTILINE)
    assert ready.data_dir == Path("/var/lib/diredi")
    assert ready.resolved_queue_url.startswith("redis://")


@pytest.mark.parametrize("name", ["diredi-api.service", "diredi-ingest@.service", "diredi-worker.service"])
def test_the_env_example_as_shipped_stops_the_service_with_the_status_not_restarted(
    name: str, tmp_path: Path
) -> None:
    # Prepare: the service's command line with the example's environment, as systemd would run it
    argv = shlex.split(directives((UNITS / name).read_text())["ExecStart"][0].replace("%i", "a"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIREDI_")}
    env |= example_values() | {"DIREDI_DATA_DIR": str(tmp_path / "data")}

    # Execute
    done = subprocess.run(  # noqa: S603
        [str(DIREDI), *argv[1:]], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )

    # Assert
    assert str(done.returncode) == CONFIG_ERROR, done.stderr
    assert "Traceback" not in done.stderr
    assert directives((UNITS / name).read_text())["RestartPreventExitStatus"] == [CONFIG_ERROR]


def doc_commands() -> list[list[str]]:
    """Every `diredi` command line in docs/deploy.md's shell blocks, as words."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.DOTALL)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [
        shlex.split(line.split(INSTALLED, 1)[1].rstrip(")"), comments=True)
        for line in lines
        if INSTALLED in line
    ]


def test_the_deploy_doc_names_only_commands_and_options_that_exist() -> None:
    # Prepare
    commands = doc_commands()
    env = {**os.environ, "COLUMNS": "200"}

    # Execute / Assert
    assert {" ".join(c[:2]) for c in commands} >= {
        "db upgrade",
        "broker init",
        "front render",
        "apikey create",
    }
    for words in commands:
        groups = ("db", "keys", "broker", "front", "apikey")  # `diredi GROUP COMMAND`
        path = words[:2] if words[0] in groups else words[:1]
        done = subprocess.run(  # noqa: S603
            [str(DIREDI), *path, "--help"], capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 0, f"`diredi {' '.join(path)}` does not exist: {done.stderr}"
        for option in (w for w in words if w.startswith("--")):
            assert option in done.stdout, f"`diredi {' '.join(path)}` has no {option}"


def test_the_deploy_doc_installs_every_unit() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for name in SERVICES:
        assert f"deploy/systemd/{name}" in text
