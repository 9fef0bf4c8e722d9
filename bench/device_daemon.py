"""Benchmark of the device daemon (DESIGN §5): RSS and CPU of `python -m device_firmware_py run`
inferring at 20 samples/s, in a process where torch cannot be imported.

The bench trains a real int8 edge model with the cloud's code (scenarios/digits-two-users.json, the
product's training plan), starts mosquitto with the production configuration (dynamic security, the
TLS listener with lab certificates), provisions one device, and gives it the state a device has after
an update: the model in its active slot, a simulated user's stream (alice's private pools and test
samples, every 10th labelled by the simulated user, RD after 100 new labels). The daemon then runs as
a child process with a `torch` package first on its path that raises ImportError. After a warm-up,
psutil reads its RSS and CPU for a fixed span, while a cloud-side subscriber collects its status
messages (the achieved rate from their `inference_count`, the latencies the daemon measures itself)
and answers its knowledge reports with receipts, as the ingest does. At the end: SIGTERM, the exit
code and how long it took to stop. Writes bench/results/device_daemon.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import queue
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from bench import mqtt_lab
from broker.acl import provision_commands
from broker.client import BrokerTarget, ClientOptions
from broker.connection import BrokerConnection
from broker.dynsec import DynsecAdmin
from cloud.ml.data import build_scenario_data
from cloud.ml.export import EdgeArtifact
from cloud.ml.families import NetSpec
from cloud.ml.line import TrainingPlan, train_line
from cloud.ml.scenario import load_scenario
from device_firmware_py.config import DeviceConfig, write_config
from device_firmware_py.daemon import STATE_FILES
from device_firmware_py.ota import ModelSlots
from testsupport.mosquitto import MosquittoProcess
from wire.knowledge import KnowledgeReport
from wire.messages import Receipt, Status, decode, encode
from wire.topics import MessageKind, device_topic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SCENARIO = ROOT / "scenarios" / "digits-two-users.json"
DEVICE_ID = "bench-cam-1"
TORCH_STUB = 'raise ImportError("torch is not installed on the device")\n'
SAMPLE_EVERY = 0.5  # seconds between two psutil readings


@dataclass
class Broker:
    """mosquitto for the bench: where a device connects, and the cloud's account."""

    process: MosquittoProcess
    device_target: BrokerTarget  # no credentials: TLS (verified against the lab CA) or plain
    cloud: BrokerTarget
    admin: BrokerTarget


@contextmanager
def running_broker(workdir: Path, *, tls: bool) -> Iterator[Broker]:
    """The benchmarks' mosquitto (bench/mqtt_lab.py), with the listener a device connects to."""
    with mqtt_lab.running_broker(workdir) as broker:
        device = broker.tls_target if tls else broker.target
        yield Broker(broker.process, device, broker.cloud, broker.admin)


def train_model(progress: Progress) -> tuple[EdgeArtifact, np.ndarray, np.ndarray]:
    """A real int8 edge model (line `bench`, version 1) and the scenario's first user's samples (their
    private pools, then their test samples), for the simulated stream. Torch runs here, in the bench."""
    scenario = load_scenario(SCENARIO)
    data = build_scenario_data(scenario)
    tasks: dict[str, TaskID] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"training: {stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)

    line = train_line(
        data.train,
        NetSpec(num_classes=data.num_classes),
        TrainingPlan(seed=3),
        line="bench",
        val=data.val,
        progress=on_progress,
    )
    user = data.users[0]
    splits = [*user.device_train, user.world_test]
    inputs = np.concatenate([s.x for s in splits]).astype(np.float32)
    labels = np.concatenate([s.y for s in splits]).astype(np.int64)
    return line.artifact, inputs, labels


def write_device(directory: Path, target: BrokerTarget, secret: str, stream: Path, *, rate_hz: float) -> Path:
    """The device's configuration, its secret file (0600) and its state directory (0700)."""
    secret_file = directory / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    key_id = secrets.token_hex(8)  # no update comes in this bench: any well-formed key will do
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    broker: dict[str, Any] = {"url": f"{'mqtts' if target.tls else 'mqtt'}://{target.host}:{target.port}"}
    if target.ca_file:
        broker["ca_file"] = target.ca_file
    config = DeviceConfig.model_validate(
        {
            "device_id": DEVICE_ID,
            "state_dir": directory / "state",
            "broker": broker,
            "credentials": {"file": secret_file},
            "api": {"url": "http://127.0.0.1:9"},
            "trust": {key_id: key},
            "input": {"source": "simulated", "path": stream, "rate_hz": rate_hz, "feedback_every": 10},
            "rd": {"min_samples": 20, "new_samples": 100},
            "status": {"interval_s": 5},
        }
    )
    return write_config(directory / "device.toml", config)


def install_model(state: Path, artifact: EdgeArtifact) -> None:
    """The model in the device's active slot, as a finished update leaves it."""
    state.mkdir(mode=0o700, exist_ok=True)
    slots = ModelSlots(state / STATE_FILES["models"])
    slots.stage(artifact.model, artifact.manifest)
    slots.switch()


def torchless_env(workdir: Path) -> dict[str, str]:
    """The child's environment: a `torch` package that cannot be imported first on its path, and no
    systemd socket of ours."""
    stub = workdir / "no-torch" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(TORCH_STUB)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), str(ROOT)])
    return env


def torch_blocked(env: dict[str, str]) -> bool:
    """Whether `import torch` fails, with the stub's message, in an interpreter with this environment."""
    probe = subprocess.run(  # noqa: S603
        [sys.executable, "-c", "import torch"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return probe.returncode != 0 and "torch is not installed on the device" in probe.stderr


def torch_mapped(pid: int) -> bool:
    """Whether any file of torch's (its shared libraries) is mapped into the process."""
    return "torch" in Path(f"/proc/{pid}/maps").read_text()


@dataclass
class CloudSide:
    """The cloud's end of the device's conversation: its status messages, and a receipt for every
    knowledge report (as the ingest sends once the report is committed)."""

    cloud: BrokerTarget
    statuses: list[tuple[float, Status]] = field(default_factory=list)  # (received, monotonic)
    reports: set[str] = field(default_factory=set)
    inbox: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        options = ClientOptions(f"bench-cloud-{secrets.token_hex(4)}")
        self.connection = BrokerConnection(self.cloud, options, timeout=10.0)
        self.connection.client.on_message = lambda _c, _u, m: self.inbox.put((m.topic, bytes(m.payload)))

    def start(self) -> None:
        self.connection.connect()
        self.connection.subscribe(
            [device_topic(DEVICE_ID, kind) for kind in (MessageKind.STATUS, MessageKind.KNOWLEDGE)]
        )

    def stop(self) -> None:
        self.connection.close()

    def drain(self) -> None:
        """Take what arrived; answer knowledge reports with receipts."""
        while True:
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            _, message = decode(topic, payload)
            if isinstance(message, Status):
                self.statuses.append((time.monotonic(), message))
            elif isinstance(message, KnowledgeReport):
                self.reports.add(str(message.msg_id))
                receipt = Receipt(device_id=DEVICE_ID, ack_of=message.msg_id)
                self.connection.send(device_topic(DEVICE_ID, MessageKind.RECEIPT), encode(receipt), qos=1)


@dataclass
class Readings:
    """psutil readings of one process over the measured span."""

    process: psutil.Process
    cpu0: float = 0.0
    rss_mb: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        times = self.process.cpu_times()
        self.cpu0 = times.user + times.system

    def sample(self) -> None:
        self.rss_mb.append(self.process.memory_info().rss / 2**20)

    def cpu_percent(self, elapsed: float) -> float:
        """Percent of one core since the readings began."""
        times = self.process.cpu_times()
        return 100 * (times.user + times.system - self.cpu0) / elapsed


def window_figures(statuses: list[Status]) -> dict[str, Any]:
    """Rate and latencies from the status messages of the measured span (at least two)."""
    first, last = statuses[0], statuses[-1]
    p50s = [s.latency_p50_ms for s in statuses[1:] if s.latency_p50_ms is not None]
    p95s = [s.latency_p95_ms for s in statuses[1:] if s.latency_p95_ms is not None]
    cpus = [s.cpu_percent for s in statuses[1:] if s.cpu_percent is not None]
    return {
        "status_messages": len(statuses),
        "inferences": last.inference_count - first.inference_count,
        "achieved_hz": (last.inference_count - first.inference_count) / (last.uptime_s - first.uptime_s),
        # each status carries the percentiles of its own interval: the median interval, and the worst
        "latency_p50_ms": statistics.median(p50s) if p50s else None,
        "latency_p95_ms": statistics.median(p95s) if p95s else None,
        "latency_p95_worst_ms": max(p95s) if p95s else None,
        "daemon_reported_cpu_percent": statistics.mean(cpus) if cpus else None,
        "daemon_reported_rss_mb_max": max((s.mem_bytes or 0) for s in statuses) / 2**20,
        "model_id": last.model_id,
        "accuracy_last_interval": last.accuracy,
    }


def run(*, seconds: float, warm_up: float, rate_hz: float, tls: bool) -> dict[str, Any]:
    """Train, start the broker and the daemon, measure it, stop it."""
    with ExitStack() as stack:
        progress = stack.enter_context(Progress())
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diredi-bench-device-")))
        artifact, inputs, labels = train_model(progress)
        broker = stack.enter_context(running_broker(workdir, tls=tls))
        secret = secrets.token_urlsafe(24)
        with DynsecAdmin(broker.admin) as admin:
            admin.execute(provision_commands(DEVICE_ID, secret))
        # Long enough that the simulated user labels throughout (a sample is labelled on its first pass)
        repeats = math.ceil(rate_hz * (warm_up + seconds + 60) / len(inputs))
        stream = workdir / "stream.npz"
        np.savez(stream, inputs=np.concatenate([inputs] * repeats), labels=np.concatenate([labels] * repeats))
        config = write_device(workdir, broker.device_target, secret, stream, rate_hz=rate_hz)
        install_model(workdir / "state", artifact)
        env = torchless_env(workdir)
        blocked = torch_blocked(env)
        if not blocked:
            raise RuntimeError("the torch stub does not keep torch out of the child")
        cloud = CloudSide(broker.cloud)
        cloud.start()
        stack.callback(cloud.stop)
        log_path = workdir / "daemon.log"
        with log_path.open("wb") as log:
            child = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "device_firmware_py", "run", "--config", str(config)],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack.callback(stop_child, child)

        def check_alive() -> None:
            cloud.drain()
            if child.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"the daemon exited with {child.returncode}:\n{tail}")

        task = progress.add_task("daemon: first status", total=None)
        deadline = time.monotonic() + 60
        while not cloud.statuses:
            check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("no status from the daemon within 60 s")
            time.sleep(0.1)
        progress.update(task, description="daemon: warm-up", total=warm_up, completed=0)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < warm_up:
            check_alive()
            progress.update(task, completed=elapsed)
            time.sleep(0.2)

        daemon, mosquitto = psutil.Process(child.pid), psutil.Process(broker.process.pid or 0)
        progress.update(task, description="daemon: measuring", total=seconds, completed=0)
        readings = [Readings(daemon), Readings(mosquitto)]
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            check_alive()
            for reading in readings:
                reading.sample()
            progress.update(task, completed=elapsed)
            time.sleep(SAMPLE_EVERY)
        elapsed = time.monotonic() - started
        cpu = [reading.cpu_percent(elapsed) for reading in readings]
        mapped = torch_mapped(child.pid)
        # the statuses whose interval lies in the span, and the one just before as the baseline
        time.sleep(0.2)
        cloud.drain()
        measured = [s for t, s in cloud.statuses if started <= t <= started + elapsed]
        before = [s for t, s in cloud.statuses if t < started][-1:]
        if len(before + measured) < 2:
            raise RuntimeError("fewer than two status messages around the measured span")
        figures = window_figures(before + measured)

        progress.update(task, description="daemon: SIGTERM")
        stopping = time.monotonic()
        child.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = child.wait(30)
        except subprocess.TimeoutExpired:
            exit_code = None
        stop_s = time.monotonic() - stopping
        cloud.drain()
        progress.update(task, completed=seconds)
    daemon_rss, mosquitto_rss = readings[0].rss_mb, readings[1].rss_mb
    return {
        "benchmark": "device_daemon",
        "transport": "mqtts" if tls else "mqtt",
        "seconds": elapsed,
        "warm_up_s": warm_up,
        "target_hz": rate_hz,
        **figures,
        "rss_mb_mean": statistics.mean(daemon_rss),
        "rss_mb_peak": max(daemon_rss),
        "cpu_percent": cpu[0],
        "mosquitto_cpu_percent": cpu[1],
        "mosquitto_rss_mb_peak": max(mosquitto_rss),
        "knowledge_reports": len(cloud.reports),
        "torch_blocked": blocked,
        "torch_mapped": mapped,
        "model_bytes": len(artifact.model),
        "stream_samples": len(inputs) * repeats,
        "exit_code": exit_code,
        "stop_s": stop_s,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
    }


def stop_child(child: subprocess.Popen[bytes]) -> None:
    """On the way out after a failure: a daemon still running is killed."""
    if child.poll() is None:
        child.kill()
        child.wait(10)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def print_table(report: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"Device daemon without torch, {report['transport']}, {report['seconds']:.0f} s measured "
        f"(Python {report['python']}, {report['cpus']} CPUs)"
    )
    table.add_column("what")
    table.add_column("measured", justify="right")
    r = report
    rows = [
        ("inference rate: target", f"{r['target_hz']:g}/s"),
        ("inference rate: achieved (status inference_count)", f"{r['achieved_hz']:.2f}/s"),
        ("RSS mean / peak (psutil)", f"{r['rss_mb_mean']:.1f} / {r['rss_mb_peak']:.1f} MB"),
        ("CPU, % of one core (psutil)", f"{r['cpu_percent']:.1f} %"),
        ("CPU, % of one core (the daemon's statuses)", f"{r['daemon_reported_cpu_percent']:.1f} %"),
        (
            "latency p50 / p95 (the daemon's, median interval)",
            f"{_ms(r['latency_p50_ms'])} / {_ms(r['latency_p95_ms'])} ms",
        ),
        ("latency p95, worst status interval", f"{_ms(r['latency_p95_worst_ms'])} ms"),
        ("status messages / knowledge reports", f"{r['status_messages']} / {r['knowledge_reports']}"),
        (
            "mosquitto CPU / RSS peak",
            f"{r['mosquitto_cpu_percent']:.2f} % / {r['mosquitto_rss_mb_peak']:.1f} MB",
        ),
        ("torch importable / mapped in the daemon", f"{not r['torch_blocked']} / {r['torch_mapped']}"),
        ("SIGTERM: exit code, stop time", f"{r['exit_code']}, {r['stop_s']:.2f} s"),
        ("load average (1 min) at the end", f"{r['load_average_1m_at_end']:.2f}"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="the measured span")
    parser.add_argument("--warm-up", type=float, default=10.0, help="seconds after the first status")
    parser.add_argument("--rate", type=float, default=20.0, help="input.rate_hz of the daemon")
    parser.add_argument("--plain", action="store_true", help="connect over plain MQTT, not TLS")
    args = parser.parse_args(argv)
    console = Console()
    report = run(seconds=args.seconds, warm_up=args.warm_up, rate_hz=args.rate, tls=not args.plain)
    print_table(report, console)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "device_daemon.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"written to {out}")
    if report["exit_code"] != 0 or report["torch_mapped"]:
        console.print("[red]the daemon loaded torch or did not stop cleanly on SIGTERM[/red]")


if __name__ == "__main__":
    main()
