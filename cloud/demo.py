"""The main job (`diredi demo`, `make demo`): the whole system and one real device daemon per scenario
user, running the DiReDi loop end to end through MQTT, Celery and the API.

For each user of the scenario the demo makes a cohort and trains its first model on the presumed data
(KD, int8), approves it and provisions a device through the API, and starts `diredi-device` as a
process of its own with the user's stream: the private samples the simulated user labels (feedback
that never leaves the device) followed by the samples the user holds out for testing. Then it only
watches: the rollout dispatches v1; the daemon serves it and measures its accuracy on the held-out
samples; after enough feedback it runs RD and sends a knowledge report; the ingest stores it; the
worker's beat starts an RD cycle job that updates the cohort's cloud model, re-distills, exports int8
and gates the result; an approved model starts a rollout; the daemon installs it and measures again.
Every figure printed is what a device measured (its status messages, read back through the API).
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess  # noqa: S404 (the device daemon, a fixed argument list)
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

import numpy as np

from cloud.exceptions import DemoError
from cloud.localsystem import LocalSystem
from cloud.ml.data import UserData
from cloud.settings import Settings
from device_firmware_py.config import DeviceConfig, write_config

log = logging.getLogger(__name__)

STEPS = 8  # the milestones of one user's loop, for progress bars
Progress = Callable[[str, int, str], None]  # (user id, milestones reached, what is happening)


@dataclass(frozen=True)
class DemoOptions:
    """How the demo runs; the defaults are what `make demo` uses."""

    rate_hz: float = 50.0  # samples each simulated device infers per second
    status_interval_s: float = 2.0
    after_windows: int = 8  # status windows measured under the new model before the demo ends
    timeout_s: float = 1200.0


@dataclass
class DeviceRun:
    """One simulated user's device and what it measured."""

    user: str
    label_map: dict[str, int]
    cohort_id: str
    device_id: str
    v1: str
    directory: Path
    v2: str | None = None
    outcome: str = ""
    reason: str = ""
    acc_v1: float | None = None
    acc_v2: float | None = None
    windows_v1: int = 0
    windows_v2: int = 0
    knowledge_bytes: int | None = None
    knowledge_to_approved_s: float | None = None
    lineage: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "process"}
        return {**out, "directory": str(self.directory)}


@dataclass
class DemoResult:
    """What the demo measured, and where to look."""

    scenario: str
    devices: list[DeviceRun]
    api_docs: str
    metrics: dict[str, int]
    data_dir: str
    logs: dict[str, str]
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**out, "devices": [d.as_dict() for d in self.devices]}


class Api:
    """The operator's REST calls the demo makes (JSON, a bearer key)."""

    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (our own API on loopback)
            self.base + path, data=data, method=method, headers={"Authorization": f"Bearer {self.key}"}
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310
                return json.loads(reply.read() or b"null")
        except HTTPError as exc:
            raise DemoError(
                f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')[:500]}"
            ) from None
        except URLError as exc:
            raise DemoError(f"{method} {path}: {exc.reason}") from None


def device_config(
    directory: Path,
    *,
    device_id: str,
    broker_url: str,
    api_url: str,
    trusted_keys: dict[str, str],
    trust_version: int,
    trust_threshold: int = 1,
    stream: Path,
    rate_hz: float,
    new_samples: int,
    status_interval_s: float,
) -> Path:
    """Write a device's configuration (the daemon's TOML format) and return its path."""
    config = DeviceConfig.model_validate(
        {
            "device_id": device_id,
            "state_dir": directory / "state",
            "trust_version": trust_version,
            "trust_threshold": trust_threshold,
            "broker": {"url": broker_url, "keepalive_s": 15},
            "credentials": {"file": directory / "secret"},
            "api": {"url": api_url, "timeout_s": 30},
            "trust": trusted_keys,
            "input": {"source": "simulated", "path": stream, "rate_hz": rate_hz, "feedback_every": 1},
            "rd": {"min_samples": 20, "new_samples": new_samples},
            "status": {"interval_s": status_interval_s},
            "spool": {"resend_after_s": 10},
        }
    )
    return write_config(directory / "device.toml", config)


def write_user_stream(path: Path, user: UserData) -> int:
    """The user's stream: their private training samples (labelled as feedback, once), then the samples
    they hold out for testing; returns how many feedback samples it holds."""
    train = user.device_train[0]
    inputs = np.concatenate([train.x, user.world_test.x])
    labels = np.concatenate([train.y, user.world_test.y])
    held_out = np.arange(len(labels)) >= len(train.y)
    np.savez(path, inputs=inputs, labels=labels, held_out=held_out)
    return len(train.y)


def _mean_accuracy(samples: list[dict[str, Any]], model_id: str) -> tuple[float | None, int]:
    values = [s["accuracy"] for s in samples if s["model_id"] == model_id and s["accuracy"] is not None]
    return (float(np.mean(values)) if values else None), len(values)


def _lineage_lines(lineage: dict[str, Any]) -> list[str]:
    """The lineage graph of a model as lines `source —relation→ target`, labels instead of ids."""
    labels = {n["id"]: n["label"] for n in lineage["nodes"]}
    return [
        f"{labels.get(e['source'], e['source'])} —{e['relation']}→ {labels.get(e['target'], e['target'])}"
        for e in lineage["edges"]
    ]


class Demo:
    """One run of the demo on a started LocalSystem."""

    def __init__(
        self, system: LocalSystem, scenario_path: Path, options: DemoOptions, progress: Progress
    ) -> None:
        self.system, self.scenario_path, self.options, self.progress = (
            system,
            scenario_path,
            options,
            progress,
        )
        self.api = Api(system.api_url, system.create_api_key(name="demo"))
        self.devices: list[DeviceRun] = []

    # Set-up: the manufacturer's side and the devices -------------------------------------------------

    def prepare(self) -> None:
        """Cohorts, their first models (trained here, as the manufacturer does), devices and streams."""
        from cloud.artifacts import LocalArtifactStore
        from cloud.ml.data import build_scenario_data
        from cloud.ml.scenario import load_scenario
        from cloud.pipeline.lines import bootstrap_line
        from cloud.registry.db import make_engine, session_factory

        scenario = load_scenario(self.scenario_path)
        data = build_scenario_data(scenario)
        settings = self.system.settings
        sessions = session_factory(make_engine(settings.resolved_database_url))
        store = LocalArtifactStore(settings.resolved_artifact_dir)
        for user in data.users:
            uid = user.spec.id
            cohort_id = f"{uid}-home"
            self.progress(uid, 0, "training the first edge model (KD, int8)")
            self.api.call("POST", "/api/v1/cohorts", {"id": cohort_id, "description": f"{uid}'s devices"})

            def stage(name: str, done: int, total: int, uid: str = uid) -> None:
                self.progress(uid, 0, f"training v1: {name} {done}/{total}")

            _, edge_id = bootstrap_line(
                sessions, store, cohort_id=cohort_id, scenario=scenario, progress=stage
            )
            self.api.call("POST", f"/api/v1/models/{edge_id}/approve", {"reason": "the manufacturer's v1"})
            device_id = f"{uid}-cam-1"
            provisioned = self.api.call("POST", "/api/v1/devices", {"id": device_id, "cohort_id": cohort_id})
            directory = self.system.data_dir / "devices" / device_id
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            secret = directory / "secret"
            secret.write_text(provisioned["secret"] + "\n")
            secret.chmod(0o600)
            stream = directory / "stream.npz"
            feedback = write_user_stream(stream, user)
            device_config(
                directory,
                device_id=device_id,
                broker_url=self.system.broker_target.url(),
                api_url=self.system.api_url,
                trusted_keys={k["key_id"]: k["public_key"] for k in provisioned["trusted_keys"]},
                trust_version=provisioned["trust_version"],
                trust_threshold=provisioned["trust_threshold"],
                stream=stream,
                rate_hz=self.options.rate_hz,
                new_samples=feedback,
                status_interval_s=self.options.status_interval_s,
            )
            label_map = {str(k): v for k, v in user.spec.label_map.items()}
            self.devices.append(DeviceRun(uid, label_map, cohort_id, device_id, edge_id, directory))
            self.progress(uid, 1, f"{edge_id} approved; {device_id} provisioned")
        engine = sessions.kw["bind"]
        engine.dispose()

    def start_devices(self) -> None:
        """Each device's daemon as a process of its own, and the rollout that dispatches v1 to it."""
        for device in self.devices:
            with (device.directory / "daemon.log").open("ab") as log_file:
                device.process = subprocess.Popen(  # noqa: S603
                    [sys.executable, "-m", "device_firmware_py", "run", "--config", "device.toml"],
                    cwd=device.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            plan = {"canary": 1, "observe_s": 0}
            self.api.call("POST", "/api/v1/rollouts", {"model_id": device.v1, "plan": plan})
            self.progress(device.user, 2, f"dispatching {device.v1} to {device.device_id}")

    def stop_devices(self) -> None:
        for device in self.devices:
            if device.process is not None and device.process.poll() is None:
                device.process.send_signal(signal.SIGTERM)
        for device in self.devices:
            if device.process is not None:
                try:
                    device.process.wait(20)
                except subprocess.TimeoutExpired:
                    device.process.kill()
                    device.process.wait()

    # The loop, watched through the API -----------------------------------------------------------------

    def watch(self) -> None:
        """Follow every device until it has measured its new model (or the gate said no)."""
        deadline = time.monotonic() + self.options.timeout_s
        waiting = list(self.devices)
        while waiting:
            self.system.check()
            for device in list(waiting):
                if device.process is not None and device.process.poll() is not None:
                    raise DemoError(
                        f"the daemon of {device.device_id} exited ({device.process.returncode}); "
                        f"see {device.directory / 'daemon.log'}"
                    )
                if self._step(device):
                    waiting.remove(device)
            if time.monotonic() > deadline:
                stuck = ", ".join(f"{d.device_id} ({d.outcome or 'in progress'})" for d in waiting)
                raise DemoError(f"the loop did not finish within {self.options.timeout_s:.0f} s: {stuck}")
            time.sleep(1.0)

    def _step(self, device: DeviceRun) -> bool:
        """Look at one device's progress; True once it is done."""
        api, uid = self.api, device.user
        status = api.call("GET", f"/api/v1/devices/{device.device_id}")
        running = status.get("reported_model_id")
        telemetry = api.call("GET", f"/api/v1/telemetry?device_id={device.device_id}&limit=10000")["items"]
        device.acc_v1, device.windows_v1 = _mean_accuracy(telemetry, device.v1)
        if running is None:
            self.progress(uid, 2, f"installing {device.v1}")
            return False
        reports = api.call("GET", f"/api/v1/knowledge?device_id={device.device_id}")["items"]
        if not reports:
            labelled = max((s["labelled_count"] or 0 for s in telemetry), default=0)
            accuracy = f"{device.acc_v1:.3f}" if device.acc_v1 is not None else "…"
            self.progress(uid, 3, f"serving {device.v1} (accuracy {accuracy}); the user labelled {labelled}")
            return False
        report = reports[-1]  # the first the device sent (newest first)
        device.knowledge_bytes = report["size_bytes"]
        jobs = api.call("GET", f"/api/v1/jobs?cohort_id={device.cohort_id}&type=rd_cycle")["items"]
        if not jobs:
            self.progress(uid, 4, f"knowledge sent ({report['size_bytes']:,} B); waiting for the pipeline")
            return False
        job = jobs[-1]  # the cohort's first cycle (newest first)
        if job["state"] in ("pending", "running"):
            self.progress(uid, 5, f"RD cycle job: {job['stage'] or 'queued'} {job['progress']:.0%}")
            return False
        device.outcome = job["result"].get("outcome", job["state"])
        device.reason = job["result"].get("reason", job["error"])
        if device.outcome != "approved":
            return True  # the gate refused, or nothing to learn: the device keeps v1
        device.v2 = job["result"]["models"][1]
        if device.knowledge_to_approved_s is None:
            model = api.call("GET", f"/api/v1/models/{device.v2}")
            decided = datetime.fromisoformat(model["decided_at"])
            device.knowledge_to_approved_s = (
                decided - datetime.fromisoformat(report["received_at"])
            ).total_seconds()
        if running != device.v2:
            self.progress(uid, 6, f"{device.v2} approved; rolling out")
            return False
        device.acc_v2, device.windows_v2 = _mean_accuracy(telemetry, device.v2)
        if device.windows_v2 < self.options.after_windows:
            self.progress(
                uid, 7, f"serving {device.v2}; measuring ({device.windows_v2}/{self.options.after_windows})"
            )
            return False
        device.lineage = _lineage_lines(api.call("GET", f"/api/v1/models/{device.v2}/lineage"))
        self.progress(uid, STEPS, f"done: {device.v1} {device.acc_v1:.3f} → {device.v2} {device.acc_v2:.3f}")
        return True


def demo_settings(data_dir: Path, base: Settings | None = None) -> Settings:
    """The demo's settings: the given ones (configured services, if any) with the demo's data directory
    and a job for every knowledge report."""
    from cloud.children import free_ports

    base = base or Settings()
    ingest_port, worker_port = free_ports(2)
    return base.model_copy(
        update={
            "data_dir": data_dir,
            "pipeline_min_reports": 1,
            "pipeline_auto_rollout": True,
            "ingest_metrics_port": ingest_port,
            "worker_metrics_port": worker_port,
        }
    )


def run_demo(
    settings: Settings,
    scenario_path: Path,
    *,
    api_port: int,
    mqtt_port: int,
    options: DemoOptions | None = None,
    progress: Progress = lambda user, step, text: None,
    on_ready: Callable[[LocalSystem], None] | None = None,
) -> DemoResult:
    """Start the system, run the loop for every user of the scenario, stop everything; return what the
    devices measured. With `on_ready`, it is called with the running system once the loop is done
    (before anything stops), e.g. to keep the system up for exploring."""
    options = options or DemoOptions()
    started = time.monotonic()
    with LocalSystem(settings, api_port=api_port, mqtt_port=mqtt_port) as system:
        demo = Demo(system, scenario_path, options, progress)
        try:
            demo.prepare()
            demo.start_devices()
            demo.watch()
            if on_ready is not None:
                on_ready(system)
        finally:
            demo.stop_devices()
        return DemoResult(
            scenario=scenario_path.name,
            devices=demo.devices,
            api_docs=system.docs_url,
            metrics=dict(system.metrics_ports),
            data_dir=str(system.data_dir),
            logs={name: str(path) for name, path in system.log_paths.items()},
            wall_s=time.monotonic() - started,
        )
