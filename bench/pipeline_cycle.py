"""Benchmark of the DiReDi cycle (DESIGN §7): a knowledge report received → an approved edge model
registered, on the real path, median over runs (target ≤ 60 s on 2 cores, aim ≤ 30 s).

The whole system runs as in production on one machine (bench/system_lab.py): mosquitto with the
production configuration, a scratch PostgreSQL registry, a redis-server of its own, and `LocalSystem`'s
`diredi ingest`, `diredi worker --beat` and `diredi api` as child processes. The line is trained once
(scenarios/digits-two-users.json, the product's TrainingPlan(seed=scenario.seed)). Each run then gives
it a fresh cohort: the same student exported to int8 again under the run's cohort id as version 1,
registered approved with its training data (as a shipped line is), and one device of user alice
provisioned in the registry and the broker. The device's own RD code (`extract_knowledge`) computes a
knowledge report on alice's private pool against that model, and it is published as the device sends
it: its credentials, QoS 1, its knowledge topic. The ingest stores it (`received_at`) and receipts it;
the worker's beat starts a job within its period (5 s); the worker runs it; the edge model v2 is
registered with its decision (`decided_at`). Measured from `received_at` to `decided_at`, with the
parts in between: ingest, wait for the beat, queue, the job's own stages (`timings_s`), commit.

Writes bench/results/pipeline_cycle.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bench.mqtt_lab import Lab, lab, provision
from bench.system_lab import local_system, processes, tree_cpu_seconds
from broker.client import BrokerTarget, ClientOptions
from broker.connection import BrokerConnection
from cloud.artifacts import LocalArtifactStore
from cloud.localsystem import LocalSystem
from cloud.ml.data import ScenarioData, build_scenario_data
from cloud.ml.export import export_int8
from cloud.ml.families import NetSpec
from cloud.ml.line import EdgeLine, TrainingPlan, train_line
from cloud.ml.recipes import search_of
from cloud.ml.scenario import Scenario, load_scenario
from cloud.pipeline.lines import register_line
from cloud.pipeline.scheduling import JOB_TYPE, TRAINING_DATA
from cloud.registry import models
from cloud.registry.db import transaction
from cloud.registry.tables import Job, JobState, KnowledgeReport, Model, ModelKind
from cloud.settings import Settings
from device_firmware_py.rd import extract_knowledge
from testsupport.redis import scratch_redis
from wire.common import utcnow
from wire.manifest import edge_model_id
from wire.messages import Receipt, decode
from wire.topics import MessageKind, device_topic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCENARIO = ROOT / "scenarios" / "digits-two-users.json"
USER = "alice"
TARGET_S = 60.0
AIM_S = 30.0  # issue 13's target with the candidate search on
FINISHED = (JobState.succeeded, JobState.failed)
DEFAULT_RECIPES = Settings.model_fields["rd_recipes"].default
STAGES = ("rd_targets", "candidates", "final", "gate")  # the job's own timings (cloud.ml.cycle.rd_cycle)


# --- the line and each run's cohort -----------------------------------------------------------------


def train(scenario: Scenario, data: ScenarioData) -> tuple[EdgeLine, float]:
    """The line, trained once as the product trains a first version; and how long it took."""
    started = time.perf_counter()
    line = train_line(
        data.train,
        NetSpec(num_classes=data.num_classes),
        TrainingPlan(seed=scenario.seed),
        line="bench-line",
        val=data.val,
    )
    return line, time.perf_counter() - started


def ship_cohort(
    lab: Lab,
    store: LocalArtifactStore,
    line: EdgeLine,
    scenario: Scenario,
    data: ScenarioData,
    *,
    cohort_id: str,
    device_id: str,
) -> tuple[EdgeLine, str]:
    """A fresh cohort whose approved version 1 is `line`'s student exported again under its id, with
    the scenario as its training data, and one device (registry and broker); the line version and the
    device's secret."""
    artifact = export_int8(
        line.student, data.train.x, model_id=edge_model_id(cohort_id, 1), line=cohort_id, version=1
    )
    shipped = EdgeLine(cohort_id, 1, line.teacher, line.student, artifact)
    secret = provision(lab, [device_id], cohort=cohort_id)[device_id]
    with transaction(lab.sessions) as session:
        cloud, edge = register_line(session, store, shipped, NetSpec(num_classes=data.num_classes))
        cloud.metrics = {TRAINING_DATA: json.loads(scenario.model_dump_json())}
        models.decide(session, edge.id, approve=True)
    return shipped, secret


# --- the device's side: one knowledge report over MQTT ----------------------------------------------


class DeviceLink:
    """One device's MQTT connection (its own credentials and client id) on paho's network thread: it
    publishes at QoS 1 and collects the cloud's receipts."""

    def __init__(self, target: BrokerTarget, device_id: str) -> None:
        self.device_id = device_id
        self.receipts: dict[uuid.UUID, datetime] = {}
        self.receipt_arrived = threading.Condition()
        self.connection = BrokerConnection(target, ClientOptions(device_id), timeout=15.0)
        self.connection.client.on_message = self._on_message

    @contextmanager
    def open(self) -> Iterator[DeviceLink]:
        """Connected and subscribed to this device's receipts, until the block ends."""
        with self.connection:
            self.connection.subscribe(device_topic(self.device_id, MessageKind.RECEIPT), qos=1)
            yield self

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        _, receipt = decode(message.topic, bytes(message.payload))
        if isinstance(receipt, Receipt):
            with self.receipt_arrived:
                self.receipts[receipt.ack_of] = utcnow()
                self.receipt_arrived.notify_all()

    def publish(self, kind: MessageKind, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        self.connection.publish(device_topic(self.device_id, kind), payload, qos=1)

    def receipt(self, msg_id: uuid.UUID, timeout: float) -> datetime | None:
        with self.receipt_arrived:
            self.receipt_arrived.wait_for(lambda: msg_id in self.receipts, timeout)
            return self.receipts.get(msg_id)


# --- one run -----------------------------------------------------------------------------------------


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()


def cycle_job(sessions: sessionmaker[Session], cohort_id: str) -> Job | None:
    with sessions() as session:
        return session.scalars(
            select(Job).where(Job.cohort_id == cohort_id, Job.type == JOB_TYPE).order_by(Job.created_at)
        ).first()


def wait_for_job(system: LocalSystem, sessions: sessionmaker[Session], cohort_id: str, timeout: float) -> Job:
    """The cohort's cycle job once it has finished (the system checked alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while (job := cycle_job(sessions, cohort_id)) is None or job.state not in FINISHED:
        system.check()
        if time.monotonic() > deadline:
            state = "never started" if job is None else f"{job.state.value} at {job.stage}"
            tail = system.children["worker"].tail()
            raise RuntimeError(
                f"the cycle job of {cohort_id} did not finish in {timeout:g} s ({state}):\n{tail}"
            )
        time.sleep(0.2)
    return job


def one_run(
    n: int,
    system: LocalSystem,
    lab: Lab,
    store: LocalArtifactStore,
    line: EdgeLine,
    scenario: Scenario,
    data: ScenarioData,
    *,
    timeout: float,
) -> dict[str, Any]:
    cohort_id, device_id = f"bench-cycle-{n}", f"{USER}-cam-{n}"
    prepare_started = time.perf_counter()
    shipped, secret = ship_cohort(lab, store, line, scenario, data, cohort_id=cohort_id, device_id=device_id)
    user = next(u for u in data.users if u.spec.id == USER)
    pool = user.device_train[0]
    report = extract_knowledge(shipped.artifact.load(), pool.x, pool.y, device_id=device_id, seed=n)
    prepare_s = time.perf_counter() - prepare_started
    worker = processes(system, lab)["worker"]
    load_before = os.getloadavg()[0]
    cpu_before, wall_before = tree_cpu_seconds(worker), time.monotonic()

    with DeviceLink(system.device_target(device_id, secret), device_id).open() as link:
        published_at = utcnow()
        link.publish(MessageKind.KNOWLEDGE, report.to_bytes())
        receipt_at = link.receipt(report.msg_id, timeout=30)
    job = wait_for_job(system, lab.sessions, cohort_id, timeout)
    worker_cpu = tree_cpu_seconds(worker) - cpu_before
    wall = time.monotonic() - wall_before

    with lab.sessions() as session:
        received_at = session.scalar(
            select(KnowledgeReport.received_at).where(KnowledgeReport.msg_id == report.msg_id)
        )
        made = session.scalars(
            select(Model).where(
                Model.cohort_id == cohort_id, Model.kind == ModelKind.edge, Model.version == 2
            )
        ).first()
    outcome = str(job.result.get("outcome", job.state.value))
    decided_at = made.decided_at if made is not None else None
    timings = {k: float(v) for k, v in (job.result.get("timings_s") or {}).items()}
    return {
        "run": n,
        "cohort": cohort_id,
        "outcome": outcome,
        "reason": job.result.get("reason") or job.error,
        "edge_model": made.id if made is not None else None,
        "edge_status": made.status.value if made is not None else None,
        "knowledge_bytes": len(report.to_bytes()),
        "received_to_decided_s": _seconds(received_at, decided_at),
        "published_to_received_s": _seconds(published_at, received_at),
        "published_to_receipt_s": _seconds(published_at, receipt_at),
        "received_to_job_created_s": _seconds(received_at, job.created_at),
        "job_created_to_started_s": _seconds(job.created_at, job.started_at),
        "job_started_to_finished_s": _seconds(job.started_at, job.finished_at),
        "job_timings_s": timings,
        "chosen": next(
            (c["recipe"] for c in job.result.get("candidates") or [] if c["status"] == "chosen"), None
        ),
        "decided_to_job_finished_s": _seconds(decided_at, job.finished_at),
        "worker_cpu_percent": 100 * worker_cpu / wall if wall else None,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
        "prepare_s": prepare_s,
    }


def run(
    admin_url: str, *, runs: int, scenario_path: Path, timeout: float, recipes: str = DEFAULT_RECIPES
) -> dict[str, Any]:
    scenario = load_scenario(scenario_path)
    data = build_scenario_data(scenario)
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("train the line (teacher, KD, int8)", total=None)
        line, train_s = train(scenario, data)
        progress.remove_task(task)
        with (
            tempfile.TemporaryDirectory(prefix="diredi-bench-redis-") as redis_dir,
            lab(admin_url) as bench_lab,
            scratch_redis(Path(redis_dir)) as redis_url,
        ):
            task = progress.add_task("start the system", total=None)
            with local_system(
                bench_lab, redis_url, pipeline_auto_rollout=False, pipeline_min_reports=1, rd_recipes=recipes
            ) as system:
                progress.remove_task(task)
                store = LocalArtifactStore(system.settings.resolved_artifact_dir)
                task = progress.add_task(f"{runs} cycle(s)", total=runs)
                for n in range(1, runs + 1):
                    rows.append(one_run(n, system, bench_lab, store, line, scenario, data, timeout=timeout))
                    progress.advance(task)
    approved = [r["received_to_decided_s"] for r in rows if r["outcome"] == "approved"]
    median = statistics.median(approved) if approved else None
    p90 = float(np.quantile(approved, 0.9)) if approved else None
    all_approved = median is not None and len(approved) == len(rows)
    return {
        "benchmark": "pipeline_cycle",
        "scenario": scenario.name,
        "user": USER,
        "recipes": recipes,
        "runs": rows,
        "approved_runs": len(approved),
        "median_received_to_approved_s": median,
        "p90_received_to_approved_s": p90,
        "target_s": TARGET_S,
        "meets_target": all_approved and median is not None and median <= TARGET_S,
        "aim_s": AIM_S,
        "meets_aim": all_approved and median is not None and median <= AIM_S,
        "line_training_s": train_s,
        "beat_period_s": 5.0,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"DiReDi cycle: knowledge received → approved edge model, {report['scenario']} user "
        f"{report['user']}, recipes {report['recipes']}, real ingest + worker on PostgreSQL + Redis "
        f"({report['cpus']} CPUs)"
    )
    columns = ["run", "outcome", "received → decided s", "publish → stored s", "stored → job s"]
    columns += ["queue s", "job s", *(f"{stage} s" for stage in STAGES), "chosen", "worker CPU %"]
    columns += ["load 1 min"]
    for column in columns:
        table.add_column(column, justify="right")
    for r in report["runs"]:
        t = r["job_timings_s"]
        table.add_row(
            str(r["run"]),
            r["outcome"],
            _s(r["received_to_decided_s"]),
            _s(r["published_to_received_s"]),
            _s(r["received_to_job_created_s"]),
            _s(r["job_created_to_started_s"]),
            _s(r["job_started_to_finished_s"]),
            *(_s(t.get(stage)) for stage in STAGES),
            r["chosen"] or "—",
            "—" if r["worker_cpu_percent"] is None else f"{r['worker_cpu_percent']:.0f}",
            f"{r['load_1min_before']:.1f}",
        )
    median = report["median_received_to_approved_s"]
    ok = "yes" if report["meets_target"] else "NO"
    aim = "yes" if report["meets_aim"] else "NO"
    table.caption = (
        f"median received → approved {_s(median)} s, p90 {_s(report['p90_received_to_approved_s'])} s "
        f"over {report['approved_runs']} approved run(s) of {len(report['runs'])} (target ≤ "
        f"{report['target_s']:g} s: {ok}; aim ≤ {report['aim_s']:g} s: {aim}); line trained once in "
        f"{report['line_training_s']:.0f} s"
    )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenario", type=Path, default=SCENARIO)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a run's job may take")
    parser.add_argument(
        "--recipes",
        default=DEFAULT_RECIPES,
        help="the worker's RD recipes (DIREDI_RD_RECIPES), e.g. re-KD for the cycle when no relabelling "
        "applies; results go to pipeline_cycle.json for the default, pipeline_cycle-<recipes>.json else",
    )
    args = parser.parse_args(argv)
    try:
        search_of(args.recipes)
    except ValueError as exc:
        parser.error(str(exc))
    admin_url = os.environ.get("DIREDI_TEST_POSTGRES_URL")
    if not admin_url:
        raise SystemExit("set DIREDI_TEST_POSTGRES_URL (scripts/services.sh postgres prints it)")
    console = Console(width=180)
    report = run(
        admin_url, runs=args.runs, scenario_path=args.scenario, timeout=args.timeout, recipes=args.recipes
    )
    print_table(report, console)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.recipes == DEFAULT_RECIPES else "-" + re.sub(r"[^A-Za-z0-9+-]+", "_", args.recipes)
    out = RESULTS / f"pipeline_cycle{suffix}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
