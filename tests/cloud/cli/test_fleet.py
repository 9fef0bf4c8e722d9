"""The operator's commands (`diredi devices|models|rollouts|jobs|telemetry show`) against a running API:
uvicorn serving the real app on loopback, on the test database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from cloud.artifacts import LocalArtifactStore
from cloud.children import free_ports
from cloud.cli.main import app as cli
from cloud.registry import jobs, telemetry
from cloud.registry.tables import Role
from device_firmware_py.config import load_config, read_secret
from tests.cloud.factories import make_cloud_model, make_edge_model
from tests.cloud.pipeline.rollout_fleet import kitchen_fleet

runner = CliRunner()


@pytest.fixture
def api_url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, for the test's duration."""
    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def env(api_url: str, keys: dict[Role, str], tmp_path: Path) -> dict[str, str]:
    """The environment of an operator's shell (no profile file)."""
    return {
        "DIREDI_API_URL": api_url,
        "DIREDI_API_KEY": keys[Role.operator],
        "DIREDI_PROFILES": str(tmp_path / "no-profiles.toml"),
    }


def diredi(env: dict[str, str], *args: str) -> Result:
    return runner.invoke(cli, list(args), env=env)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_devices_are_provisioned_labelled_selected_and_revoked(
    env: dict[str, str], session: Session, store: LocalArtifactStore, tmp_path: Path
) -> None:
    # Prepare
    kitchen_fleet(session, store, [])
    secret_file = tmp_path / "cam-0001.secret"

    # Execute
    shown = diredi(env, "devices", "provision", "cam-0000", "--cohort", "kitchen", "--label", "site=lab")
    filed = diredi(
        env, "devices", "provision", "cam-0001", "--cohort", "kitchen",
        "--label", "site=roof", "--label", "tier=beta", "--secret-file", str(secret_file),
    )  # fmt: skip
    relabel = diredi(env, "devices", "label", "cam-0000", "tier=ga", "site-")
    selected = as_json(diredi(env, "devices", "list", "--selector", "tier,!site", "--json"))
    every = as_json(diredi(env, "devices", "list", "--all", "--json"))
    table = diredi(env, "devices", "list", "-l", "site=roof")
    revoked = as_json(diredi(env, "devices", "revoke", "cam-0001", "--json"))
    shown_again = as_json(diredi(env, "devices", "show", "cam-0001", "--json"))

    # Assert
    assert shown.exit_code == 0 and "secret (shown once): " in shown.stdout
    assert filed.exit_code == 0 and f"secret written to {secret_file}" in filed.stdout
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and len(secret_file.read_text().strip()) > 20
    assert relabel.exit_code == 0, relabel.output
    assert [d["id"] for d in selected] == ["cam-0000"]
    assert [d["id"] for d in every] == ["cam-0000", "cam-0001"]
    assert "cam-0001" in table.stdout and "cam-0000" not in table.stdout and "devices: 1 of 1" in table.stdout
    assert revoked["status"] == "revoked" == shown_again["status"]


def test_a_model_is_approved_and_its_lineage_read(
    env: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: a candidate v3 on top of the kitchen's approved v1 and v2
    fleet = kitchen_fleet(session, store, ["cam-0000"])
    teacher = make_cloud_model(session, store)
    candidate = make_edge_model(session, store, teacher_id=teacher.id, parent_id=fleet.v2).id
    session.commit()

    # Execute
    listed = as_json(diredi(env, "models", "list", "--kind", "edge", "--status", "candidate", "--json"))
    approved = as_json(diredi(env, "models", "approve", candidate, "--reason", "canary looks fine", "--json"))
    again = diredi(env, "models", "reject", candidate)
    lineage = diredi(env, "models", "lineage", candidate)
    mermaid = diredi(env, "models", "lineage", candidate, "--mermaid")

    # Assert
    assert [m["id"] for m in listed] == [candidate]
    assert approved["status"] == "approved"
    assert (
        again.exit_code == 2
        and again.stderr.startswith("error: 409 Conflict: ")
        and "Traceback" not in again.output
    )
    assert lineage.exit_code == 0 and fleet.v2 in lineage.stdout
    assert mermaid.stdout.lstrip().startswith(("graph", "flowchart"))


def test_a_rollout_to_a_selector_is_started_steered_and_shown(
    env: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: three kitchen devices; two on the roof
    fleet = kitchen_fleet(session, store, ["cam-0000", "cam-0001", "cam-0002"])
    for device_id in ("cam-0001", "cam-0002"):
        assert diredi(env, "devices", "label", device_id, "site=roof").exit_code == 0

    # Execute
    nobody = diredi(env, "rollouts", "create", fleet.v2, "--selector", "site=moon")
    started = as_json(diredi(env, "rollouts", "create", fleet.v2, "--selector", "site=roof", "--json"))
    rollout_id = started["id"]
    paused = as_json(diredi(env, "rollouts", "pause", rollout_id, "--reason", "lunch", "--json"))
    resumed = as_json(diredi(env, "rollouts", "resume", rollout_id, "--json"))
    shown = as_json(diredi(env, "rollouts", "show", rollout_id, "--json"))
    listed = diredi(env, "rollouts", "list")
    waited = diredi(env, "rollouts", "watch", rollout_id, "--interval", "0.2", "--timeout", "1")
    rolled = as_json(diredi(env, "rollouts", "rollback", rollout_id, "--reason", "changed my mind", "--json"))
    watched = diredi(env, "rollouts", "watch", rollout_id, "--interval", "0.2", "--timeout", "1")

    # Assert: only the selected devices are targets; with no worker to advance it, a watch gives up
    assert sorted(t["device_id"] for t in shown["target_list"]) == ["cam-0001", "cam-0002"]
    assert (started["scope"], started["selector"]) == ("selector", "site=roof")
    assert paused["state"] == "paused" and resumed["state"] in ("pending", "running")
    assert rollout_id in listed.stdout
    assert rolled["state"] in ("halted", "rolled_back")
    assert waited.exit_code == 3 and "still pending" in waited.stderr
    assert watched.exit_code == 3 and "still halted" in watched.stderr  # no worker rolls it back
    assert nobody.exit_code == 2 and "no active device of cohort kitchen matches" in nobody.stderr


def test_a_halted_rollout_is_stopped_and_a_watch_says_so(
    env: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    fleet = kitchen_fleet(session, store, ["cam-0000"])
    rollout_id = as_json(diredi(env, "rollouts", "create", fleet.v2, "--json"))["id"]

    # Execute
    halted = as_json(diredi(env, "rollouts", "halt", rollout_id, "--reason", "not today", "--json"))
    watched = diredi(env, "rollouts", "watch", rollout_id, "--interval", "0.2", "--timeout", "5")

    # Assert
    assert halted["state"] == "stopped"
    assert watched.exit_code == 1
    assert watched.stdout.strip().endswith(
        f"rollout {rollout_id}: stopped (halted by {halted['created_by']}: not today)"
    )


def test_jobs_and_telemetry_are_read(
    env: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    kitchen_fleet(session, store, ["cam-0000"])
    now = datetime.now(UTC)
    samples = [
        {"msg_id": uuid.uuid4(), "device_id": "cam-0000", "at": now - timedelta(minutes=m), "accuracy": 0.9}
        for m in range(3)
    ]
    telemetry.add_samples(session, samples)
    session.commit()

    # Execute
    jobs = as_json(diredi(env, "jobs", "list", "--json"))
    shown = diredi(env, "telemetry", "show", "--device", "cam-0000", "--limit", "2")
    missing = diredi(env, "jobs", "show", "00000000-0000-0000-0000-000000000000")
    not_an_id = diredi(env, "jobs", "show", "nope")

    # Assert
    assert jobs == []
    assert shown.exit_code == 0 and "samples: 2 of 3" in shown.stdout and "mean accuracy 0.9" in shown.stdout
    assert missing.exit_code == 2 and missing.stderr.startswith("error: 404 Not Found")
    assert not_an_id.exit_code == 2 and "not a job id" in not_an_id.stderr


@pytest.mark.parametrize(
    ("setting", "why", "code"),
    [
        ({"DIREDI_API_URL": "http://127.0.0.1:1"}, "cannot reach the API at http://127.0.0.1:1", 3),
        ({"DIREDI_API_URL": "ftp://example"}, "must be http(s)://host[:port]", 2),
        ({"DIREDI_API_KEY": "drk_nope"}, "error: 401 Unauthorized", 2),
        ({"DIREDI_API_URL": ""}, "no API URL", 2),
    ],
)
def test_a_wrong_configuration_is_one_line_with_its_exit_code(
    env: dict[str, str], setting: dict[str, str], why: str, code: int
) -> None:
    result = diredi({**env, **setting}, "devices", "list")

    assert result.exit_code == code, result.output
    assert why in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_viewer_may_read_but_not_change(
    env: dict[str, str], keys: dict[Role, str], session: Session
) -> None:
    as_viewer = {**env, "DIREDI_API_KEY": keys[Role.viewer]}

    listed = diredi(as_viewer, "devices", "list")
    refused = diredi(as_viewer, "devices", "provision", "cam-0009", "--cohort", "kitchen")

    assert listed.exit_code == 0
    assert refused.exit_code == 2 and refused.stderr.startswith("error: 403 Forbidden")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["devices", "label", "cam-0000", "site"], "not a label: 'site'"),
        (["devices", "provision", "cam-0000", "--cohort", "kitchen", "--label", "=x"], "not a label"),
        (["devices", "list", "--selector", "site=a=b"], "422"),
        (["rollouts", "show", "not-a-uuid"], "not a rollout id"),
        (["rollouts", "create", "m.v2", "--device", "a", "--selector", "x"], "exclude each other"),
        (["devices", "show", "a/b"], "not a valid id"),
    ],
)
def test_garbage_arguments_are_one_line_errors(env: dict[str, str], args: list[str], why: str) -> None:
    result = diredi(env, *args)

    assert result.exit_code == 2, result.output
    assert why in result.stderr and "Traceback" not in result.output


def test_a_profile_gives_url_and_key_and_must_be_private(
    env: dict[str, str], keys: dict[Role, str], tmp_path: Path
) -> None:
    # Prepare: a profile file with the key in it, and one with a key file
    profiles = tmp_path / "profiles.toml"
    key_file = tmp_path / "viewer.key"
    key_file.write_text(keys[Role.viewer] + "\n")
    key_file.chmod(0o600)
    profiles.write_text(
        f'[default]\nurl = "{env["DIREDI_API_URL"]}"\nkey = "{keys[Role.operator]}"\n\n'
        f'[viewer]\nurl = "{env["DIREDI_API_URL"]}"\nkey_file = "{key_file}"\n'
    )
    bare = {"DIREDI_PROFILES": str(profiles)}

    # Execute
    profiles.chmod(0o644)
    readable = diredi(bare, "devices", "list")
    profiles.chmod(0o600)
    by_default = diredi(bare, "devices", "list")
    by_name = diredi(
        {**bare, "DIREDI_PROFILE": "viewer"}, "devices", "provision", "cam-0009", "--cohort", "k"
    )
    unknown = diredi(bare, "devices", "list", "--profile", "prod")
    profiles.write_text("[default\n")
    broken = diredi(bare, "devices", "list")

    # Assert
    assert readable.exit_code == 2 and "others may read it: chmod 600" in readable.stderr
    assert by_default.exit_code == 0, by_default.output
    assert by_name.exit_code == 2 and "403" in by_name.stderr  # the viewer's key was used
    assert unknown.exit_code == 2 and "has no profile 'prod'" in unknown.stderr
    assert broken.exit_code == 2 and "is not valid TOML" in broken.stderr


def test_the_version_is_printed() -> None:
    result = runner.invoke(cli, ["--version"])

    assert result.exit_code == 0 and result.stdout.startswith("diredi ")


def test_a_secret_file_that_exists_is_refused_before_anything_is_provisioned(
    env: dict[str, str], session: Session, store: LocalArtifactStore, tmp_path: Path
) -> None:
    kitchen_fleet(session, store, [])
    taken = tmp_path / "taken.secret"
    taken.write_text("keep me\n")

    result = diredi(
        env, "devices", "provision", "cam-0000", "--cohort", "kitchen", "--secret-file", str(taken)
    )
    listed = as_json(diredi(env, "devices", "list", "--json"))

    assert result.exit_code == 2 and "cannot create the secret file" in result.stderr
    assert taken.read_text() == "keep me\n" and listed == []


def test_a_device_kit_is_a_configuration_the_daemon_loads(
    env: dict[str, str], session: Session, store: LocalArtifactStore, tmp_path: Path
) -> None:
    # Prepare
    kitchen_fleet(session, store, [])
    kit = tmp_path / "kits" / "cam-0000"

    # Execute
    result = diredi(
        env, "devices", "provision", "cam-0000", "--cohort", "kitchen", "--device-dir", str(kit),
        "--broker-url", "mqtt://127.0.0.1:1883?protocol=3.1.1",
    )  # fmt: skip

    # Assert: the daemon's own loader takes it, with the secret and the keys provisioning returned
    assert result.exit_code == 0, result.output
    assert "diredi-device run --config" in result.stdout and "secret (shown once)" not in result.stdout
    config = load_config(kit / "device.toml")
    assert (config.device_id, config.broker.url) == ("cam-0000", "mqtt://127.0.0.1:1883?protocol=3.1.1")
    assert config.api.url == env["DIREDI_API_URL"] and config.input.path == kit / "inbox"
    assert config.trust and "0" * 16 not in config.trust
    assert len(read_secret(config)) >= 32
    assert stat.S_IMODE((kit / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(kit.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (["--broker-url", "http://127.0.0.1:1883"], "broker.url"),
        (["--broker-url", "mqtt://broker.example:1883"], "would send the secret unencrypted"),
        ([], "--device-dir and --broker-url go together"),
        (["--broker-url", "mqtts://b:8883", "--secret-file", "s"], "leave out --secret-file"),
        (["--broker-url", "mqtts://b:8883", "taken"], "exists; a kit never overwrites one"),
    ],
    ids=["not mqtt", "plaintext off loopback", "no broker", "two secrets", "kit exists"],
)
def test_a_device_kit_that_cannot_be_is_refused_before_anything_is_provisioned(
    env: dict[str, str],
    session: Session,
    store: LocalArtifactStore,
    tmp_path: Path,
    options: list[str],
    why: str,
) -> None:
    # Prepare: a kit directory that already holds a device.toml, for "kit exists"
    kitchen_fleet(session, store, [])
    kit = tmp_path / "kit"
    if "taken" in options:
        options = options[:-1]
        kit.mkdir()
        (kit / "device.toml").write_text("keep me\n")

    # Execute
    result = diredi(
        env, "devices", "provision", "cam-0000", "--cohort", "kitchen", "--device-dir", str(kit), *options
    )
    listed = as_json(diredi(env, "devices", "list", "--json"))

    # Assert: one line, nothing provisioned, no secret left behind
    assert result.exit_code == 2 and why in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert listed == [] and not (kit / "secret").exists()


def test_a_command_to_an_offline_device_waits_and_is_listed(
    env: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: a device that has never connected
    kitchen_fleet(session, store, ["cam-0000"])

    # Execute
    queued = as_json(diredi(env, "devices", "command", "cam-0000", "report_now", "--no-wait", "--json"))
    waited = diredi(
        env, "devices", "command", "cam-0000", "run_rd", "--ttl", "60", "--interval", "0.2", "--timeout", "1"
    )
    listed = as_json(diredi(env, "devices", "commands", "cam-0000", "--json"))
    unknown = diredi(env, "devices", "command", "cam-0000", "reboot", "--no-wait")
    too_short = diredi(env, "devices", "command", "cam-0000", "report_now", "--ttl", "5")

    # Assert: nothing answers, so both wait; the newest first
    assert (queued["command"], queued["state"]) == ("report_now", "pending")
    assert waited.exit_code == 3 and "run_rd on cam-0000 still pending after 1 s" in waited.stderr
    assert [(c["command"], c["state"]) for c in listed] == [("run_rd", "pending"), ("report_now", "pending")]
    assert unknown.exit_code == 2 and unknown.stderr.startswith("error: 422 Unprocessable")
    assert too_short.exit_code == 2 and "Traceback" not in too_short.output


def test_a_job_is_cancelled_and_retried(
    env: dict[str, str], session: Session, store: LocalArtifactStore
) -> None:
    # Prepare: an RD cycle a worker runs
    kitchen_fleet(session, store, [])
    running = jobs.create_job(session, type="rd_cycle", cohort_id="kitchen")
    jobs.claim(session, running.id, owner="worker-a", lease_s=60)
    session.commit()

    # Execute
    cancelled = as_json(diredi(env, "jobs", "cancel", str(running.id), "--reason", "wrong data", "--json"))
    retried = as_json(diredi(env, "jobs", "retry", str(running.id), "--json"))
    refused = diredi(env, "jobs", "retry", str(running.id))

    # Assert
    assert cancelled["state"] == "cancelled" and cancelled["error"].endswith("wrong data")
    assert retried["state"] == "pending" and retried["params"]["retry_of"] == str(running.id)
    assert refused.exit_code == 2 and refused.stderr.startswith("error: 409 Conflict: ")
