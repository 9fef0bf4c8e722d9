"""Benchmark of per-device costs no other benchmark measures (docs/capacity.md): the bytes of one
retained DesiredModel as the cloud publishes it, and what mosquitto holds for it in memory and on disk.

The document is made as the cloud makes it: the default scenario's edge network (untrained: a
manifest's size does not depend on the weights' values) exported to int8 by the product's
`export_int8`, whose manifest is signed by a `KeyRing` and encoded as the publisher encodes it; a
device's presence and a status from the device daemon's own telemetry window are encoded beside it.
Then a mosquitto with the production configuration (bench/mqtt_lab.py, persistence on) on loopback
takes `--documents` retained desired models on distinct device topics, published by `CloudPublisher`
in waves of 1,000, with its RSS read before and at each quarter; then the same devices' retained
presence. Stopped (SIGTERM: it writes its whole state, as each autosave does) and started again, it
gives the size of its persistence file and the time to write and to load it. `--quick` uses a
manifest of the same shape made without torch (bench/publish_wave.py) and 1,000 documents.
Writes bench/results/capacity_units.json.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from bench import harness
from bench.mqtt_lab import CLOUD_USER, running_broker
from broker.client import ClientOptions
from broker.connection import BrokerConnection, Sent
from cloud.publisher import CloudPublisher
from cloud.signing import Desired, KeyRing
from device_firmware_py.telemetry import Window
from wire.manifest import ArtifactManifest
from wire.messages import Presence, PresenceState, encode
from wire.topics import MessageKind, device_topic

SCENARIO = harness.ROOT / "scenarios" / "digits-two-users.json"
WAVE = 1_000  # documents per publish_desired_many, and presence messages per window of PUBACKs
CHECKPOINTS = 4  # RSS readings while the retained documents grow
SETTLE_S = 0.5  # before an RSS reading: mosquitto has freed what it held for the last wave's sends
MAX_DOCUMENTS = 200_000  # ~1.4 GB of retained documents in mosquitto


def exported_manifest() -> ArtifactManifest:
    """The manifest `export_int8` makes for the default scenario's edge network (imports torch)."""
    from cloud.ml.data import build_scenario_data
    from cloud.ml.distill import seed_everything
    from cloud.ml.export import export_int8
    from cloud.ml.families import NetSpec
    from cloud.ml.scenario import load_scenario

    scenario = load_scenario(SCENARIO)
    data = build_scenario_data(scenario)
    seed_everything(scenario.seed)
    _, student = NetSpec(num_classes=data.num_classes).build()
    student.eval()
    return export_int8(student, data.train.x, model_id="capacity.v1", line="capacity", version=1).manifest


def synthetic_manifest() -> ArtifactManifest:
    """A manifest of the production model's shape, made without torch (bench/publish_wave.py)."""
    from bench.publish_wave import manifest

    return manifest(1)


def device_id(n: int) -> str:
    """The n-th simulated device's id."""
    return f"cap-{n:07d}"


def message_sizes(ring: KeyRing, model: ArtifactManifest) -> dict[str, int]:
    """Bytes on the wire of one device's signed desired model, its presence and one status."""
    desired = ring.sign_desired(device_id=device_id(0), manifest=model)
    presence = Presence(device_id=device_id(0), state=PresenceState.online, conn="0123456789abcdef")
    window = Window()
    for n in range(600):  # ten seconds of inferences, every class seen, some labelled
        window.record(4.0 + n % 7, 0.9, n % model.num_classes, n % model.num_classes if n % 5 == 0 else None)
    status = window.status(
        device_id(0),
        model_id=model.model_id,
        uptime_s=86_400.0,
        inference_count=600,
        labelled_count=120,
        cpu_percent=23.5,
        trust_version=1,
    )
    return {
        "desired": len(encode(desired)),
        "manifest": len(model.model_dump_json(by_alias=True)),
        "presence": len(encode(presence)),
        "status": len(encode(status)),
    }


def rss_mb(process: psutil.Process) -> float:
    """mosquitto's resident memory in MiB, read after it settled."""
    time.sleep(SETTLE_S)
    return float(process.memory_info().rss) / 2**20


def publish_presence(connection: BrokerConnection, count: int) -> None:
    """Each device's retained `online` presence, as the cloud account (its ACL covers diredi/v1/)."""
    for start in range(0, count, WAVE):
        sent: list[Sent] = []
        for n in range(start, min(start + WAVE, count)):
            presence = Presence(device_id=device_id(n), state=PresenceState.online, conn=f"c{n:x}")
            sent.append(
                connection.send(
                    device_topic(device_id(n), MessageKind.PRESENCE), encode(presence), retain=True
                )
            )
        for message in sent:
            connection.wait(message)


def run(documents: int, *, quick: bool, say: Console) -> dict[str, Any]:
    """Make the documents, load them into mosquitto, restart it; the report."""
    started = time.monotonic()
    model = synthetic_manifest() if quick else exported_manifest()
    say.log(f"manifest made in {time.monotonic() - started:.1f} s ({'synthetic' if quick else 'exported'})")
    with tempfile.TemporaryDirectory(prefix="diredi-bench-") as scratch:
        workdir = Path(scratch)
        ring = KeyRing.open(workdir / "keys")
        sizes = message_sizes(ring, model)
        with running_broker(workdir) as broker:
            mosquitto = psutil.Process(broker.process.pid)
            checkpoints = [{"documents": 0, "rss_mb": rss_mb(mosquitto)}]
            publish_s, done = 0.0, 0
            with CloudPublisher(broker.cloud, ring, timeout=60) as publisher:
                for quarter in range(1, CHECKPOINTS + 1):
                    target = documents * quarter // CHECKPOINTS
                    while done < target:
                        wave = [Desired(device_id(n), model) for n in range(done, min(done + WAVE, target))]
                        began = time.perf_counter()
                        publisher.publish_desired_many(wave)
                        publish_s += time.perf_counter() - began
                        done += len(wave)
                    checkpoints.append({"documents": done, "rss_mb": rss_mb(mosquitto)})
                    say.log(f"{done:,} retained desired models, mosquitto {checkpoints[-1]['rss_mb']:.1f} MB")
            options = ClientOptions(f"{CLOUD_USER}-presence", max_inflight=100)
            with BrokerConnection(broker.cloud, options, timeout=60) as connection:
                publish_presence(connection, documents)
            rss_with_presence = rss_mb(mosquitto)
            began = time.perf_counter()
            broker.process.stop(timeout=120)
            stop_s = time.perf_counter() - began
            database = broker.process.state_dir / "mosquitto.db"
            database_bytes = database.stat().st_size
            began = time.perf_counter()
            broker.process.start(timeout=120)
            start_s = time.perf_counter() - began
            rss_restarted = rss_mb(psutil.Process(broker.process.pid))
    return report(
        documents,
        quick=quick,
        sizes=sizes,
        checkpoints=checkpoints,
        publish_s=publish_s,
        rss_with_presence=rss_with_presence,
        database_bytes=database_bytes,
        stop_s=stop_s,
        start_s=start_s,
        rss_restarted=rss_restarted,
    )


def report(
    documents: int,
    *,
    quick: bool,
    sizes: dict[str, int],
    checkpoints: list[dict[str, float]],
    publish_s: float,
    rss_with_presence: float,
    database_bytes: int,
    stop_s: float,
    start_s: float,
    rss_restarted: float,
) -> dict[str, Any]:
    """The figures, each per retained message where it is one."""
    idle, loaded = checkpoints[0]["rss_mb"], checkpoints[-1]["rss_mb"]
    per_desired = (loaded - idle) * 2**20 / documents
    per_presence = (rss_with_presence - loaded) * 2**20 / documents
    # The slope between consecutive readings: a straight line says the cost is per message.
    slopes = [
        (b["rss_mb"] - a["rss_mb"]) * 2**20 / (b["documents"] - a["documents"])
        for a, b in zip(checkpoints, checkpoints[1:], strict=False)
    ]
    return {
        "benchmark": "capacity_units",
        "quick": quick,
        "manifest": "synthetic (bench/publish_wave.py)"
        if quick
        else f"export_int8 of {SCENARIO.name}'s edge network",
        "documents": documents,
        "bytes": sizes,
        "mosquitto": {
            "rss_mb_idle": idle,
            "checkpoints": checkpoints,
            "rss_mb_with_desired": loaded,
            "rss_bytes_per_desired": per_desired,
            "rss_bytes_per_desired_slopes": slopes,
            "rss_bytes_per_desired_spread": (min(slopes), max(slopes)) if slopes else None,
            "overhead_bytes_per_desired": per_desired - sizes["desired"],
            "rss_mb_with_presence": rss_with_presence,
            "rss_bytes_per_presence": per_presence,
            "persistence_bytes": database_bytes,
            "persistence_bytes_per_device": database_bytes / documents,
            "stop_s": stop_s,  # SIGTERM → exit: writes the persistence file
            "start_s": start_s,  # start → accepting: reads it back
            "rss_mb_after_restart": rss_restarted,
        },
        "desired_per_s": documents / publish_s if publish_s else None,
        "median_slope": statistics.median(slopes) if slopes else None,
        **harness.machine_keys(),
    }


def show(report: dict[str, Any], console: Console) -> None:
    """Print the figures as a table."""
    sizes, broker, n = report["bytes"], report["mosquitto"], report["documents"]
    table = harness.table(
        f"Per-device units ({n:,} devices, {report['manifest']})", ("unit", "value"), left=1
    )
    table.add_row(
        "signed DesiredModel on the wire", f"{sizes['desired']:,} B (manifest {sizes['manifest']:,} B)"
    )
    table.add_row("presence / status on the wire", f"{sizes['presence']:,} B / {sizes['status']:,} B")
    table.add_row("mosquitto RSS idle", f"{broker['rss_mb_idle']:.1f} MB")
    table.add_row(f"… with {n:,} retained desired models", f"{broker['rss_mb_with_desired']:.1f} MB")
    low, high = broker["rss_bytes_per_desired_spread"] or (0.0, 0.0)
    table.add_row(
        "RSS per retained desired model",
        f"{broker['rss_bytes_per_desired']:,.0f} B ({low:,.0f}–{high:,.0f} between readings)",
    )
    table.add_row("… of which beyond the payload", f"{broker['overhead_bytes_per_desired']:,.0f} B")
    table.add_row("RSS per retained presence", f"{broker['rss_bytes_per_presence']:,.0f} B")
    table.add_row(
        "persistence file (desired + presence)",
        f"{broker['persistence_bytes'] / 2**20:,.1f} MB, "
        f"{broker['persistence_bytes_per_device']:,.0f} B a device",
    )
    table.add_row(
        "stop (writes it) / start (reads it)", f"{broker['stop_s']:.2f} s / {broker['start_s']:.2f} s"
    )
    table.add_row("RSS after the restart", f"{broker['rss_mb_after_restart']:.1f} MB")
    table.add_row("desired models published (signed, PUBACKed)", f"{report['desired_per_s']:,.0f}/s")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "capacity_units")
    parser.add_argument("--documents", type=int, default=20_000, help="retained desired models (20,000)")
    parser.add_argument("--quick", action="store_true", help="1,000 documents, a manifest made without torch")
    args = parser.parse_args(argv)
    documents = 1_000 if args.quick else args.documents
    if not CHECKPOINTS <= documents <= MAX_DOCUMENTS:
        parser.error(f"--documents: between {CHECKPOINTS} and {MAX_DOCUMENTS:,}")
    console = Console()
    result = run(documents, quick=args.quick, say=console)
    show(result, console)
    harness.write_results(result, args.out, console)


if __name__ == "__main__":
    main()
