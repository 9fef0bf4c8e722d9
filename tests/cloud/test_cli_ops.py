"""The operator commands around the registry: migrations, API keys, signing keys, telemetry, the API check."""

from __future__ import annotations

import dataclasses
import json
import stat
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cloud.artifacts import LocalArtifactStore
from cloud.cli.main import app
from cloud.ml import line
from cloud.ml.distill import TrainConfig
from cloud.ml.line import TrainingPlan, plan_for
from cloud.ml.scenario import Scenario
from cloud.registry import apikeys, migrate, telemetry
from cloud.registry.db import make_engine, session_factory, transaction
from cloud.registry.tables import ApiKey, AuditLog, Cohort, Job, JobState, Model, Role, utcnow
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model

WIDE = {"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory of its own (SQLite registry, keys) for the commands."""
    data = tmp_path / "data"
    monkeypatch.setenv("DIREDI_DATA_DIR", str(data))
    monkeypatch.delenv("DIREDI_DATABASE_URL", raising=False)
    for name, value in WIDE.items():
        monkeypatch.setenv(name, value)
    return data


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_db_upgrade_downgrade_and_current(env: Path) -> None:
    # Execute
    up = invoke("db", "upgrade")
    current = invoke("db", "current")
    down = invoke("db", "downgrade", "base")
    after = invoke("db", "current")

    # Assert
    head = migrate.head()
    assert up[0] == 0 and f"registry at revision {head}" in up[1]
    assert current == (0, str(head))
    assert down[0] == 0 and "base (empty)" in down[1]
    assert after == (0, "base (empty)")


def test_db_upgrade_makes_the_registry_owner_only(env: Path) -> None:
    # Execute
    code, _ = invoke("db", "upgrade")

    # Assert: the registry (credential hashes, knowledge, the audit log) and its WAL are the owner's alone
    assert code == 0
    assert stat.S_IMODE(env.stat().st_mode) == 0o700
    files = [p for p in env.iterdir() if p.name.startswith("registry.db")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


@pytest.mark.parametrize(("path", "mode", "fix"), [("registry.db", 0o644, "chmod 600"), (".", 0o777, "go-w")])
def test_a_registry_that_others_can_read_or_replace_is_refused(
    env: Path, path: str, mode: int, fix: str
) -> None:
    # Prepare
    invoke("db", "upgrade")
    (env / path).chmod(mode)

    # Execute
    results = [invoke("db", "upgrade"), invoke("apikey", "create", "--role", "admin", "--name", "x")]

    # Assert: one line naming the file and the fix, for the migration and for any other command
    for code, output in results:
        assert code == 2, output
        assert "the registry" in output and fix in output and "Traceback" not in output


def test_a_database_url_of_another_kind_is_refused(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("DIREDI_DATABASE_URL", "mysql://somewhere/db")

    # Execute
    code, output = invoke("db", "upgrade")

    # Assert
    assert code == 2
    assert "database_url" in output and "sqlite:// or postgresql://" in output


def test_an_unknown_revision_is_a_clear_error(env: Path) -> None:
    code, output = invoke("db", "upgrade", "no-such-revision")

    assert code == 2
    assert "no-such-revision" in output


def test_apikey_create_prints_a_working_key_once_and_audits(env: Path) -> None:
    # Prepare
    invoke("db", "upgrade")

    # Execute
    code, output = invoke("apikey", "create", "--role", "operator", "--name", "ops")

    # Assert
    assert code == 0
    key = next(word for word in output.split() if word.startswith("drk_"))
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    with sessions() as session:
        row = apikeys.authenticate(session, key)
        assert row is not None and row.role is Role.operator and row.name == "ops"
        assert key not in json.dumps([r.key_hash for r in session.scalars(select(ApiKey))])
        assert session.scalar(select(func.count()).where(AuditLog.action == "apikey.create")) == 1


@pytest.mark.parametrize("role", ["boss", "", "ADMIN"])
def test_apikey_create_refuses_an_unknown_role(env: Path, role: str) -> None:
    invoke("db", "upgrade")

    code, output = invoke("apikey", "create", "--role", role)

    assert code == 2
    assert "--role" in output


def test_keys_export_rotate_and_retire(env: Path) -> None:
    # Execute
    first = json.loads(invoke("keys", "export")[1])
    code, rotated = invoke("keys", "rotate", "--now")
    both = json.loads(invoke("keys", "export")[1])
    old = next(iter(first))
    retired = invoke("keys", "retire", old)
    last = json.loads(invoke("keys", "export")[1])

    # Assert
    assert code == 0 and len(first) == 1
    new = rotated.split()[3]
    assert rotated.endswith("(trust version 2)")
    assert set(both) == {old, new}
    assert retired == (0, f"retired {old}")
    assert set(last) == {new}
    assert stat.S_IMODE((env / "keys").stat().st_mode) == 0o700


def test_keys_rotate_stages_and_activate_waits_for_the_fleet(env: Path) -> None:
    # Prepare: one active device that has not reported the new trust version
    invoke("db", "upgrade")
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    with transaction(sessions) as session:
        make_cohort(session)
        make_device(session, "cam-a")
    old = next(iter(json.loads(invoke("keys", "export")[1])))

    # Execute
    code, staged = invoke("keys", "rotate")
    new = staged.split()[3]
    status = invoke("keys", "status")
    refused = invoke("keys", "activate", new)
    forced = invoke("keys", "activate", new, "--force")

    # Assert
    assert code == 0 and "staged signing key" in staged and "trust version 2" in staged
    assert status[0] == 0 and "1 active devices behind" in status[1]
    assert f"{old} active" in status[1] and f"{new} staged" in status[1]
    assert refused[0] == 2 and "1 active devices do not report trust version 2" in refused[1]
    assert forced == (0, f"active signing key: {new}")


def test_keys_revoke_removes_a_key_from_the_chain(env: Path) -> None:
    # Prepare
    old = next(iter(json.loads(invoke("keys", "export")[1])))
    new = invoke("keys", "rotate")[1].split()[3]

    # Execute: the active key is the compromised one
    code, output = invoke("keys", "revoke", old)

    # Assert
    assert code == 0 and f"trust version 3, active key {new}" in output
    assert set(json.loads(invoke("keys", "export")[1])) == {new}


@pytest.mark.parametrize("key_id", ["../keys", "0123456789abcdef", "active"])
def test_keys_retire_refuses_what_is_not_a_trusted_key(env: Path, key_id: str) -> None:
    invoke("keys", "export")  # creates the first key

    code, output = invoke("keys", "retire", key_id)

    assert code == 2
    assert "no trusted key" in output


def test_telemetry_prune_keeps_what_is_within_the_retention(env: Path) -> None:
    # Prepare
    invoke("db", "upgrade")
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    now = utcnow()
    with transaction(sessions) as session:
        make_cohort(session)
        make_device(session, "cam-0001")
        telemetry.add_samples(
            session,
            [
                {"msg_id": uuid.uuid4(), "device_id": "cam-0001", "at": now - timedelta(days=d)}
                for d in (0.5, 1.5, 3, 10)
            ],
        )

    # Execute
    code, output = invoke("telemetry", "prune", "--days", "2")

    # Assert
    assert code == 0 and "deleted 2 telemetry rows" in output
    with sessions() as session:
        assert len(telemetry.query_page(session, device_id="cam-0001", limit=10)[0]) == 2


def test_broker_crl_writes_the_crl_and_says_what_a_pid_file_it_cannot_use_is(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    unmigrated = invoke("broker", "crl")
    invoke("db", "upgrade")

    # Execute
    written = invoke("broker", "crl")
    monkeypatch.setenv("DIREDI_BROKER_PID_FILE", str(tmp_path / "no-such.pid"))
    no_broker = invoke("broker", "crl")

    # Assert: one line each; the CRL is written even when the broker cannot be reloaded
    assert unmigrated[0] != 0 and "diredi db upgrade" in unmigrated[1]
    assert written[0] == 0 and "0 revoked" in written[1] and (env / "keys" / "ca" / "crl.pem").exists()
    assert no_broker[0] != 0 and "cannot reload it" in no_broker[1] and "Traceback" not in no_broker[1]


def test_telemetry_prune_refuses_a_negative_retention(env: Path) -> None:
    code, output = invoke("telemetry", "prune", "--days", "-1")

    assert code == 2
    assert "--days" in output


def test_the_api_refuses_to_start_on_an_unmigrated_registry(env: Path) -> None:
    code, output = invoke("api", "--port", "8999")

    assert code == 2
    assert "diredi db upgrade" in output


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_the_api_refuses_a_bad_port(env: Path, port: str) -> None:
    code, output = invoke("api", "--port", port)

    assert code == 2
    assert "--port" in output


def test_line_create_refuses_a_missing_scenario(env: Path, tmp_path: Path) -> None:
    invoke("db", "upgrade")

    code, output = invoke(
        "line", "create", "--cohort", "home-cams", "--scenario", str(tmp_path / "none.json")
    )

    assert code == 2
    assert "none.json" in output


def test_line_create_refuses_a_cohort_that_has_a_line_before_training(env: Path, tmp_path: Path) -> None:
    # Prepare: home-cams has its v1
    invoke("db", "upgrade")
    store = LocalArtifactStore(tmp_path / "artifacts")
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    with transaction(sessions) as session:
        make_cohort(session, "home-cams")
        teacher = make_cloud_model(session, store, "home-cams")
        make_edge_model(session, store, teacher_id=teacher.id, cohort_id="home-cams")

    # Execute
    code, output = invoke("line", "create", "--cohort", "home-cams", "--data", "digits")

    # Assert: refused at once, with no job left behind
    assert code == 2
    assert output == (
        "error: cohort home-cams already has a model line; its next versions come from RD cycles "
        "(a line of other data or another family starts in a cohort of its own)"
    )
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


@pytest.mark.slow
def test_line_create_whose_export_gives_up_exits_with_one_line_and_leaves_a_failed_job(
    env: Path, tmp_path: Path, small_scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an export guard no int8 model can meet (int8 a whole point above float); how well the
    # models learn does not matter here, so they train for two epochs
    def short_plan(*args: Any, **kwargs: Any) -> TrainingPlan:
        two = TrainConfig(epochs=2)
        return dataclasses.replace(plan_for(*args, **kwargs), teacher=two, student=two)

    monkeypatch.setattr(line, "plan_for", short_plan)
    invoke("db", "upgrade")
    scenario = tmp_path / "small.json"
    scenario.write_text(small_scenario.model_dump_json())

    # Execute
    run = CliRunner().invoke(
        app,
        ["line", "create", "--cohort", "home-cams", "--scenario", str(scenario), "--max-int8-drop", "-1"],
    )

    # Assert: one line of error after the progress lines, no traceback; the failed job holds the
    # reason and every attempt
    assert run.exit_code == 2, run.output
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: int8 export gave up"), run.stderr
    assert run.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in run.output
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.type, job.cohort_id, job.state) == ("bootstrap", "home-cams", JobState.failed)
        assert job.error.startswith("ExportGaveUp: int8 export gave up")
        assert job.result["export"] and not any(a["accepted"] for a in job.result["export"])
        assert session.scalar(select(func.count()).select_from(Model)) == 0


def test_the_worker_refuses_to_start_on_an_unmigrated_registry(env: Path) -> None:
    code, output = invoke("worker", "--metrics-port", "0")

    assert code == 2
    assert "diredi db upgrade" in output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--name", "a b"], "--name"),
        (["--name", "x" * 41], "--name"),
        (["--concurrency", "0"], "--concurrency"),
        (["--metrics-port", "70000"], "--metrics-port"),
    ],
)
def test_the_worker_refuses_bad_options(env: Path, args: list[str], says: str) -> None:
    invoke("db", "upgrade")

    code, output = invoke("worker", *args)

    assert code == 2
    assert says in output


def test_a_bad_redis_url_is_refused_before_the_worker_starts(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIREDI_REDIS_URL", "http://127.0.0.1:6379")

    code, output = invoke("worker")

    assert code == 2
    assert "redis_url" in output


@pytest.mark.parametrize("value", ["8MiB", "1024", "-1", str(1 << 31)])
def test_an_ingest_byte_budget_out_of_range_is_refused_before_it_starts(
    env: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DIREDI_INGEST_BATCH_BYTES", value)

    code, output = invoke("ingest")

    assert code == 2
    assert "ingest_batch_bytes" in output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--data", "nope"], "--data nope: not digits, mnist-5k, an existing .npz file or an image folder"),
        (["--data", "missing.npz"], "--data missing.npz: not digits, mnist-5k"),
        (["--data", "digits", "--image-size", "8x8"], "--image-size and --channels are for image folders"),
        (["--data", "{folder}", "--image-size", "12by4"], "--image-size 12by4: must be HxW"),
        (["--data", "digits", "--family", "no_such_module_here:f"], "cannot import no_such_module_here"),
        (["--data", "digits", "--family", "bad name"], "not one of mlp, conv nor an import path"),
        ([], "name the data: --data"),
    ],
)
def test_line_create_refuses_bad_data_and_family_options_before_storing_anything(
    env: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    # Prepare
    invoke("db", "upgrade")
    folder = tmp_path / "images"
    folder.mkdir()

    # Execute
    run = CliRunner().invoke(
        app, ["line", "create", "--cohort", "home-cams", *[a.format(folder=folder) for a in args]]
    )

    # Assert: one line, and no cohort or job left behind
    assert run.exit_code == 2, run.output
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 1 and says in errors[0], run.stderr
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
        assert session.execute(select(func.count()).select_from(Cohort)).scalar() == 0


@pytest.mark.slow
def test_line_create_trains_a_family_named_by_import_path_on_an_npz_and_logs_progress_off_a_terminal(
    env: Path, tmp_path: Path
) -> None:
    # Prepare: 3 classes of 12×12 grey images that differ by where their bright square is
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    images = rng.integers(0, 60, size=(len(labels), 12, 12), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 4 * label : 4 * label + 4, 2:10] = 250
    data = tmp_path / "squares.npz"
    np.savez(data, x=images, y=labels, class_names=np.array(["top", "middle", "bottom"]))
    invoke("db", "upgrade")

    # Execute
    run = CliRunner().invoke(
        app,
        [
            "line",
            "create",
            "--cohort",
            "squares",
            "--data",
            str(data),
            "--family",
            "tests.cloud.families:tiny",
        ],
    )

    # Assert: registered; each stage logged as lines (CliRunner is not a terminal)
    assert run.exit_code == 0, run.output
    assert "registered squares.cloud.v1 (cloud) and squares.v1 (edge" in " ".join(run.stdout.split())
    logged = run.stderr.splitlines()
    for stage in ("teacher", "distill", "export"):
        assert any(f"] {stage}: " in line for line in logged), run.stderr
    sessions = session_factory(make_engine(f"sqlite:///{env / 'registry.db'}"))
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.params["family"] == "tests.cloud.families:tiny" and job.params["data"] == str(data)
        assert job.state is JobState.succeeded
