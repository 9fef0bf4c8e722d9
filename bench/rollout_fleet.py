"""Benchmark of a rollout (DESIGN §5): an approved edge model rolled out in waves to 1,000 simulated
devices through the real worker, broker, API and ingest.

The whole system runs as in production on one machine (bench/system_lab.py): mosquitto with the
production configuration, a scratch PostgreSQL registry, a redis-server of its own, and `LocalSystem`'s
`diredi ingest`, `diredi worker --beat` and `diredi api`. N devices are provisioned in the registry and
the broker (each its own credentials and ACL role, written into mosquitto's dynamic-security file as
bench/mqtt_lab.py does), all running v1 of their line; v2 is approved. Both are real int8 artifacts of
the product's edge network (the student exported twice with other calibration data, as a re-export
makes a new version; the nets are not trained: the devices here only download and verify them).

One process simulates the fleet (bench/device_swarm.py: paho clients on one selector loop): every
device is online and subscribed to its `model/desired` topic. On a desired model it does what the
daemon does before it swaps: verifies the Ed25519 signature against the cloud's trusted keys, downloads
the artifact from `diredi api` with its own Basic credentials (the daemon's own download code, at most
`--concurrency` at a time), checks size and sha256, then publishes an `installed` ack (QoS 1), which the
ingest stores and which moves the device's rollout target. The rollout is started with
POST /api/v1/rollouts (canary, then waves; `observe_s` 0 and no telemetry to judge, so a wave is done
when every device of it has answered) and the worker's beat advances it every 5 s.

Measured: POST → every target installed, and → the rollout completed; each wave (offered, all
documents received, all downloaded, all acked, settled); desired models published per second (seen at
the devices), artifact downloads per second and MB/s served by the API, download latency p50/p95; CPU
of each process. Writes bench/results/rollout_fleet.json.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import func, select, update

from bench import harness
from bench.device_swarm import SimDevice, Swarm
from bench.mqtt_lab import Lab, provision, raise_open_files
from bench.system_lab import lab_and_redis, local_system, processes, tree_cpu_seconds
from broker.client import BrokerTarget
from cloud.artifacts import LocalArtifactStore
from cloud.children import http_ok
from cloud.ml.data import build_scenario_data
from cloud.ml.distill import seed_everything
from cloud.ml.export import export_int8
from cloud.ml.families import NetSpec
from cloud.ml.line import EdgeLine
from cloud.ml.scenario import load_scenario
from cloud.pipeline.lines import register_line
from cloud.registry import models
from cloud.registry.db import transaction
from cloud.registry.tables import Device, Role, Rollout, RolloutState, RolloutTarget, TargetState
from cloud.signing import KeyRing
from device_firmware_py.config import Identity
from device_firmware_py.download import download
from wire.common import utcnow
from wire.desired import DesiredModel, verify_raw
from wire.errors import ContractError
from wire.manifest import edge_model_id
from wire.messages import AckResult, ModelAck, encode
from wire.topics import MessageKind, device_topic

# its presumed data calibrates the int8 export
SCENARIO = harness.ROOT / "scenarios" / "digits-two-users.json"
COHORT = "rollout-fleet"
MAX_ARTIFACT_BYTES = 64 * 2**20
DOWNLOAD_TIMEOUT_S = 60.0
POLL_S = 0.5  # how often the registry is read while the rollout runs
ENDED = (RolloutState.halted, RolloutState.rolled_back)


def device_ids(count: int) -> list[str]:
    return [f"roll-{n:05d}" for n in range(count)]


# --- the line: v1 (what the fleet runs) and v2 (approved, to roll out) -------------------------------


def ship_versions(lab: Lab, store: LocalArtifactStore) -> tuple[str, str, int]:
    """Register v1 and v2 of the fleet's line (both approved) and make every device run and want v1;
    the two model ids and v2's artifact size."""
    scenario = load_scenario(SCENARIO)
    data = build_scenario_data(scenario)
    spec = NetSpec(num_classes=data.num_classes)
    seed_everything(scenario.seed)
    teacher, student = spec.build()
    teacher.eval(), student.eval()
    artifacts = [
        export_int8(student, calibration, model_id=edge_model_id(COHORT, v), line=COHORT, version=v)
        for v, calibration in ((1, data.train.x), (2, data.train.x[256:]))
    ]
    with transaction(lab.sessions) as session:
        _, v1 = register_line(session, store, EdgeLine(COHORT, 1, teacher, student, artifacts[0]), spec)
        _, v2 = register_line(
            session, store, EdgeLine(COHORT, 2, teacher, student, artifacts[1]), spec, parent=v1
        )
        for model in (v1, v2):
            models.decide(session, model.id, approve=True)
        session.execute(
            update(Device)
            .where(Device.cohort_id == COHORT)
            .values(reported_model_id=v1.id, desired_model_id=v1.id)
        )
        return v1.id, v2.id, v2.size


# --- the simulated fleet -------------------------------------------------------------------------------


@dataclass
class Install:
    """What one device did with the desired model it was sent (monotonic times)."""

    desired_at: float | None = None
    model_id: str = ""
    download_started: float | None = None
    download_done: float | None = None
    bytes: int = 0
    error: str = ""
    acked_at: float | None = None  # the broker's PUBACK of the device's ack


class RolloutSwarm(Swarm):
    """The fleet of bench/device_swarm.py, each device also subscribed to its desired model and acting on
    it: verify, download (a bounded thread pool), check, ack. Heartbeats stay paused."""

    def __init__(
        self,
        target: BrokerTarget,
        secrets_by_id: dict[str, str],
        *,
        api_url: str,
        trusted: dict[str, bytes],
        concurrency: int,
    ) -> None:
        self.api_url = api_url
        self.trusted = trusted
        self.secrets_by_id = secrets_by_id
        self.installs: dict[str, Install] = {}
        self.subscribed = 0
        self.refused_subscriptions = 0
        self.downloads_running = 0
        self.downloads_peak = 0
        self._running_lock = threading.Lock()
        self._done: queue.SimpleQueue[tuple[SimDevice, str, str]] = (
            queue.SimpleQueue()
        )  # (device, model, error)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="download")
        super().__init__(target, secrets_by_id, heartbeat_s=3600.0)
        self.heartbeats_paused = True

    def _make(self, device_id: str, secret: str) -> SimDevice:
        device = super()._make(device_id, secret)
        device.client.on_message = self._on_message
        device.client.on_subscribe = self._on_subscribe
        self.installs[device_id] = Install()
        return device

    def serve(self, seconds: float, step: float = 0.05) -> None:
        """Run the network for `seconds`, publishing the acks of finished downloads as they come."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.run_for(min(step, left))
            self._send_acks()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        super().close()

    # paho callbacks (on the loop's thread) -------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        device: SimDevice,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        super()._on_connect(client, device, flags, reason, properties)
        if device.online:
            client.subscribe(device_topic(device.device_id, MessageKind.MODEL_DESIRED), qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        device: SimDevice,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            self.refused_subscriptions += 1
        else:
            self.subscribed += 1

    def _on_message(self, client: mqtt.Client, device: SimDevice, message: mqtt.MQTTMessage) -> None:
        install = self.installs[device.device_id]
        install.desired_at = time.monotonic()
        try:
            document = verify_raw(bytes(message.payload), self.trusted)
            if document.device_id != device.device_id:
                raise ContractError(f"the document is for {document.device_id}")
        except ContractError as exc:
            install.error = f"refused the desired model: {exc}"
            self._ack(device, "unknown", AckResult.failed, install.error)
            return
        install.model_id = document.manifest.model_id
        self._pool.submit(self._fetch, device, document)

    def _on_publish(
        self, client: mqtt.Client, device: SimDevice, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        if device.inflight.get(mid) is MessageKind.MODEL_ACK and not reason.is_failure:
            self.installs[device.device_id].acked_at = time.monotonic()
        super()._on_publish(client, device, mid, reason, properties)

    # the download (a pool thread) ------------------------------------------------------------------

    def _fetch(self, device: SimDevice, document: DesiredModel) -> None:
        install = self.installs[device.device_id]
        with self._running_lock:
            self.downloads_running += 1
            self.downloads_peak = max(self.downloads_peak, self.downloads_running)
        error = ""
        install.download_started = time.monotonic()
        try:
            body = download(
                self.api_url,
                document.download_path,
                device_id=device.device_id,
                identity=Identity(secret=self.secrets_by_id[device.device_id]),
                expected_size=document.manifest.size,
                max_bytes=MAX_ARTIFACT_BYTES,
                ca_file=None,
                timeout=DOWNLOAD_TIMEOUT_S,
                cancelled=threading.Event(),
            )
            install.bytes = len(body)
            if (
                len(body) != document.manifest.size
                or hashlib.sha256(body).hexdigest() != document.manifest.sha256
            ):
                error = "the artifact does not match its manifest (size or sha256)"
        except Exception as exc:  # the daemon acks any failure as `failed` with its reason
            error = f"download failed: {type(exc).__name__}: {exc}"
        install.download_done = time.monotonic()
        with self._running_lock:
            self.downloads_running -= 1
        self._done.put((device, document.manifest.model_id, error))

    # back on the loop's thread ----------------------------------------------------------------------

    def _send_acks(self) -> None:
        while True:
            try:
                device, model_id, error = self._done.get_nowait()
            except queue.Empty:
                return
            if error:
                self.installs[device.device_id].error = error
            self._ack(device, model_id, AckResult.failed if error else AckResult.installed, error)

    def _ack(self, device: SimDevice, model_id: str, result: AckResult, reason: str) -> None:
        ack = ModelAck(
            device_id=device.device_id,
            model_id=model_id,
            result=result,
            reason=reason[:1024],
            running_model_id=model_id if result is AckResult.installed else None,
        )
        self._publish(device, MessageKind.MODEL_ACK, encode(ack), qos=1)


# --- measuring ---------------------------------------------------------------------------------------


def target_states(lab: Lab, rollout_id: uuid.UUID) -> dict[str, int]:
    with lab.sessions() as session:
        rows = session.execute(
            select(RolloutTarget.state, func.count())
            .where(RolloutTarget.rollout_id == rollout_id)
            .group_by(RolloutTarget.state)
        ).all()
    return {state.value: int(count) for state, count in rows}


def rollout_state(lab: Lab, rollout_id: uuid.UUID) -> RolloutState:
    with lab.sessions() as session:
        return session.get_one(Rollout, rollout_id).state


def worker_published(port: int) -> float | None:
    """The worker's count of desired models published for rollouts (its Prometheus counter)."""
    text = http_ok(f"http://127.0.0.1:{port}/metrics") or ""
    found = re.search(r'^diredi_worker_desired_published_total\{reason="rollout"\} ([0-9.e+]+)$', text, re.M)
    return float(found[1]) if found else None


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] if ordered else None


def _rate(count: float, start: float | None, end: float | None) -> float | None:
    return count / (end - start) if start is not None and end is not None and end > start else None


def waves_report(
    lab: Lab, swarm: RolloutSwarm, rollout_id: uuid.UUID, posted_wall: datetime, posted: float
) -> list[dict[str, Any]]:
    """Each wave: its size, and when (seconds after the POST) it was offered, received, downloaded,
    acked and settled, with its publish and download rates."""
    with lab.sessions() as session:
        rollout = session.get_one(Rollout, rollout_id)
        stages = list(rollout.waves.get("stages") or [])
        waves = dict(
            session.execute(
                select(RolloutTarget.device_id, RolloutTarget.wave).where(
                    RolloutTarget.rollout_id == rollout_id
                )
            ).all()
        )
        installed = dict(
            session.execute(
                select(RolloutTarget.wave, func.max(RolloutTarget.updated_at))
                .where(RolloutTarget.rollout_id == rollout_id, RolloutTarget.state == TargetState.installed)
                .group_by(RolloutTarget.wave)
            ).all()
        )

    def wall(value: Any) -> float | None:
        return (
            (datetime.fromisoformat(value) - posted_wall).total_seconds() if isinstance(value, str) else None
        )

    def rel(values: list[float | None], pick: Any) -> float | None:
        present = [v for v in values if v is not None]
        return pick(present) - posted if present else None

    rows = []
    for wave_no, stage in enumerate(stages):
        members = [swarm.installs[d] for d, w in waves.items() if w == wave_no]
        received = [i.desired_at for i in members]
        started = [i.download_started for i in members]
        done = [i.download_done for i in members]
        size = sum(i.bytes for i in members)
        first_received, last_received = rel(received, min), rel(received, max)
        first_download, last_download = rel(started, min), rel(done, max)
        last_installed = installed.get(wave_no)
        rows.append(
            {
                "wave": wave_no,
                "devices": len(members),
                "offered_s": wall(stage.get("offered_at")),
                "first_desired_s": first_received,
                "all_desired_s": last_received,
                "all_downloaded_s": last_download,
                "all_acked_s": rel([i.acked_at for i in members], max),
                "all_installed_s": (last_installed - posted_wall).total_seconds() if last_installed else None,
                "settled_s": wall(stage.get("settled_at")),
                "desired_per_s": _rate(len(members), first_received, last_received),
                "downloads_per_s": _rate(len(members), first_download, last_download),
                "download_mb_per_s": _rate(size / 2**20, first_download, last_download),
            }
        )
    return rows


def run(
    admin_url: str, *, count: int, concurrency: int, plan: dict[str, Any], timeout: float
) -> dict[str, Any]:
    raise_open_files(count + 1024)
    with lab_and_redis(admin_url) as (bench_lab, redis_url), Progress(transient=True) as progress:
        task = progress.add_task(f"provision {count:,} devices", total=None)
        started = time.monotonic()
        secrets_by_id = provision(bench_lab, device_ids(count), cohort=COHORT, broker_stopped=True)
        provision_s = time.monotonic() - started
        progress.remove_task(task)
        task = progress.add_task("start the system, export v1 and v2", total=None)
        with local_system(bench_lab, redis_url, pipeline_auto_rollout=False) as system:
            v1, v2, artifact_bytes = ship_versions(
                bench_lab, LocalArtifactStore(system.settings.resolved_artifact_dir)
            )
            key = system.create_api_key(Role.operator, name="bench")
            trusted = KeyRing.open(system.settings.resolved_signing_key_dir).trusted()
            progress.remove_task(task)
            swarm = RolloutSwarm(
                system.broker_target,
                secrets_by_id,
                api_url=system.api_url,
                trusted=trusted,
                concurrency=concurrency,
            )
            try:
                task = progress.add_task(f"connect and subscribe {count:,} devices", total=count)
                swarm.connect_all(on_answer=lambda _: progress.advance(task))
                deadline = time.monotonic() + 60
                while swarm.subscribed + swarm.refused_subscriptions < count and time.monotonic() < deadline:
                    swarm.serve(0.1)
                swarm.serve(1.0)  # presence stored, the subscriptions settled
                progress.remove_task(task)
                if swarm.subscribed != count:
                    raise RuntimeError(
                        f"{swarm.subscribed} of {count} devices subscribed ({swarm.refused_subscriptions} "
                        f"refused, {sum(d.refused is not None for d in swarm.devices)} not connected)"
                    )
                measured = run_rollout(system, bench_lab, swarm, v2, key, plan, timeout, count, progress)
            finally:
                swarm.close()
    downloads = [
        i.download_done - i.download_started
        for i in swarm.installs.values()
        if i.download_done is not None and i.download_started is not None and not i.error
    ]
    ok = (
        measured["installed"] == count
        and measured["devices_running_model"] == count
        and not measured["errors"]
        and measured["rollout_state"] == RolloutState.completed.value
    )
    return {
        "benchmark": "rollout_fleet",
        "devices": count,
        "download_concurrency": concurrency,
        "plan": plan,
        "from_model": v1,
        "model": v2,
        "artifact_bytes": artifact_bytes,
        "provision_seconds": provision_s,
        **measured,
        "download_ms_p50": 1000 * (_percentile(downloads, 0.5) or 0.0),
        "download_ms_p95": 1000 * (_percentile(downloads, 0.95) or 0.0),
        "download_ms_max": 1000 * max(downloads, default=0.0),
        "downloads_in_flight_peak": swarm.downloads_peak,
        "ok": ok,
        **harness.machine_keys(),
    }


def run_rollout(
    system: Any,
    bench_lab: Lab,
    swarm: RolloutSwarm,
    model_id: str,
    key: str,
    plan: dict[str, Any],
    timeout: float,
    count: int,
    progress: Progress,
) -> dict[str, Any]:
    """POST the rollout, serve the fleet until every target is installed and the rollout completed (or
    it halted, or `timeout`); the figures."""
    procs = {**processes(system, bench_lab), "simulator": psutil.Process()}
    cpu0 = {name: tree_cpu_seconds(p) for name, p in procs.items()}
    load0 = os.getloadavg()[0]
    worker_port = system.metrics_ports.get("worker", 0)
    published0 = worker_published(worker_port) or 0.0
    posted_wall, posted = utcnow(), time.monotonic()
    answer = httpx.post(
        f"{system.api_url}/api/v1/rollouts",
        json={"model_id": model_id, "plan": plan},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    post_s = time.monotonic() - posted
    if answer.status_code != 201:
        raise RuntimeError(f"POST /api/v1/rollouts answered {answer.status_code}: {answer.text[:500]}")
    rollout_id = uuid.UUID(answer.json()["id"])
    task = progress.add_task("rollout: installed", total=count)
    all_installed_s = completed_s = None
    states: dict[str, int] = {}
    state = RolloutState.pending
    next_poll = time.monotonic()
    while time.monotonic() - posted < timeout:
        swarm.serve(0.05)
        if time.monotonic() < next_poll:
            continue
        next_poll = time.monotonic() + POLL_S
        system.check()
        states, state = target_states(bench_lab, rollout_id), rollout_state(bench_lab, rollout_id)
        installed = states.get(TargetState.installed.value, 0)
        progress.update(task, completed=installed)
        if installed == count and all_installed_s is None:
            all_installed_s = time.monotonic() - posted  # refined from the registry below
        if state is RolloutState.completed:
            completed_s = time.monotonic() - posted
            break
        if state in ENDED:
            break
    elapsed = time.monotonic() - posted
    cpu = {name: 100 * (tree_cpu_seconds(p) - cpu0[name]) / elapsed for name, p in procs.items()}
    progress.remove_task(task)
    waves = waves_report(bench_lab, swarm, rollout_id, posted_wall, posted)
    with bench_lab.sessions() as session:
        rollout = session.get_one(Rollout, rollout_id)
        last_installed = session.scalar(
            select(func.max(RolloutTarget.updated_at)).where(
                RolloutTarget.rollout_id == rollout_id, RolloutTarget.state == TargetState.installed
            )
        )
        reason, final_state = rollout.reason, rollout.state
        running = session.scalar(
            select(func.count()).select_from(Device).where(Device.reported_model_id == model_id)
        )
        completed_at = rollout.updated_at if final_state is RolloutState.completed else None
    installs = list(swarm.installs.values())
    received = [i.desired_at for i in installs if i.desired_at is not None]
    started = [i.download_started for i in installs if i.download_started is not None]
    done = [i.download_done for i in installs if i.download_done is not None]
    downloaded_bytes = sum(i.bytes for i in installs)
    # Rates over the time the fleet was busy: each wave from its first document to its last (the
    # waits for the beat between waves left out), summed over the waves.
    publish_span = sum(
        w["all_desired_s"] - w["first_desired_s"] for w in waves if w["first_desired_s"] is not None
    )
    download_span = sum(
        w["all_downloaded_s"] - (w["first_desired_s"] or 0.0)
        for w in waves
        if w["all_downloaded_s"] is not None
    )
    return {
        "rollout_id": str(rollout_id),
        "rollout_state": final_state.value,
        "rollout_reason": reason,
        "post_ms": 1000 * post_s,
        "installed": states.get(TargetState.installed.value, 0),
        "target_states": states,
        "devices_running_model": int(running or 0),
        "all_installed_s": (last_installed - posted_wall).total_seconds()
        if last_installed
        else all_installed_s,
        "completed_s": (completed_at - posted_wall).total_seconds() if completed_at else completed_s,
        "waves": waves,
        "desired_received": len(received),
        "desired_published_by_worker": (worker_published(worker_port) or 0.0) - published0,
        "desired_per_s": len(received) / publish_span if publish_span > 0 else None,
        "downloads": len(done),
        "downloaded_mb": downloaded_bytes / 2**20,
        "downloads_per_s": len(done) / download_span if download_span > 0 else None,
        "download_mb_per_s": downloaded_bytes / 2**20 / download_span if download_span > 0 else None,
        "downloads_first_to_last_s": (max(done) - min(started)) if done and started else None,
        "acks_puback": sum(i.acked_at is not None for i in installs),
        "errors": sorted({i.error for i in installs if i.error})[:5],
        "cpu_percent": cpu,
        "load_1min_before": load0,
        "load_1min_after": os.getloadavg()[0],
    }


def _s(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_table(report: dict[str, Any], console: Console) -> None:
    n = report["devices"]
    waves = harness.table(
        f"Rollout of {report['model']} ({report['artifact_bytes']:,} B) to {n:,} simulated devices: "
        f"worker + mosquitto + API + ingest, {report['download_concurrency']} downloads at a time "
        f"({report['cpus']} CPUs); seconds after the POST",
        (
            "wave", "devices", "offered", "all desired received", "all downloaded", "all acked",
            "all installed (registry)", "settled", "desired/s", "downloads/s",
        ),
    )  # fmt: skip
    for w in report["waves"]:
        waves.add_row(
            "canary" if w["wave"] == 0 else str(w["wave"]),
            f"{w['devices']:,}",
            _s(w["offered_s"]),
            _s(w["all_desired_s"]),
            _s(w["all_downloaded_s"]),
            _s(w["all_acked_s"]),
            _s(w["all_installed_s"]),
            _s(w["settled_s"]),
            _s(w["desired_per_s"], 0),
            _s(w["downloads_per_s"], 0),
        )
    console.print(waves)
    table = harness.table("Rollout totals", ("figure", "value"), left=1)
    cpu = report["cpu_percent"]
    rows = [
        ("POST /api/v1/rollouts", f"{report['post_ms']:.0f} ms"),
        ("POST → every target installed", f"{_s(report['all_installed_s'])} s"),
        ("POST → rollout completed", f"{_s(report['completed_s'])} s ({report['rollout_state']})"),
        ("targets installed", f"{report['installed']:,} / {n:,}"),
        ("devices the registry shows running it", f"{report['devices_running_model']:,} / {n:,}"),
        (
            "desired models received / published by the worker",
            f"{report['desired_received']:,} / {report['desired_published_by_worker']:,.0f}",
        ),
        ("desired models / s (while publishing)", _s(report["desired_per_s"], 0)),
        ("artifact downloads", f"{report['downloads']:,} ({report['downloaded_mb']:.1f} MB)"),
        ("downloads / s (while a wave downloads)", _s(report["downloads_per_s"], 0)),
        ("MB / s served by the API", _s(report["download_mb_per_s"], 2)),
        (
            "download latency p50 / p95 / max",
            f"{report['download_ms_p50']:.0f} / {report['download_ms_p95']:.0f} / "
            f"{report['download_ms_max']:.0f} ms",
        ),
        ("errors", "; ".join(report["errors"]) or "none"),
        (
            "CPU % api / worker / ingest / mosquitto / simulator",
            f"{cpu['api']:.0f} / {cpu['worker']:.0f} / {cpu['ingest']:.0f} / {cpu['mosquitto']:.0f} / "
            f"{cpu['simulator']:.0f}",
        ),
        (
            "load average (1 min) before / after",
            f"{report['load_1min_before']:.1f} / {report['load_1min_after']:.1f}",
        ),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "rollout_fleet")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32, help="artifact downloads at a time")
    parser.add_argument("--canary", type=int, default=10)
    parser.add_argument(
        "--waves",
        type=float,
        nargs="+",
        default=[0.01, 0.1, 0.5, 1.0],
        help="cumulative fractions after the canary",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the rollout may take")
    args = parser.parse_args(argv)
    admin_url = harness.postgres_url()
    # Nothing to judge but the installs: no telemetry is sent, and a settled wave is not watched.
    plan = {"canary": args.canary, "waves": args.waves, "observe_s": 0.0, "min_status": 1}
    console = Console(width=160)
    report = run(admin_url, count=args.devices, concurrency=args.concurrency, plan=plan, timeout=args.timeout)
    print_table(report, console)
    harness.write_results(report, args.out, console)
    if not report["ok"]:
        raise SystemExit("rollout benchmark: not every device installed the model (see the table)")


if __name__ == "__main__":
    main()
