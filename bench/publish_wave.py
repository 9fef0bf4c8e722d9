"""Benchmark of publishing a rollout wave's signed desired models (`CloudPublisher`), which the rollout
engine does inside the transaction that holds the wave's row locks (cloud/pipeline/rollouts.py).

Against mosquitto with the production configuration (bench/mqtt_lab.py), for waves of several sizes:
one `publish_desired` per device (each waits for its PUBACK), as the engine did before, against one
`publish_desired_many` (all sent back to back, the PUBACKs awaited together). The documents carry a
manifest of the production model's shape (10 classes, 64 features: about 4 KB signed). Each size runs
`--repeats` times in alternation; the table gives medians. Writes bench/results/publish_wave.json.
PostgreSQL comes from DIREDI_TEST_POSTGRES_URL (the lab's registry; this benchmark does not use it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.console import Console

from bench import harness
from bench.mqtt_lab import lab
from cloud.publisher import CloudPublisher
from cloud.signing import Desired, KeyRing
from testsupport.registry import make_manifest
from wire.manifest import ArtifactManifest
from wire.messages import encode

NUM_CLASSES, FEATURE_DIM, SIDE = 10, 64, 8  # cloud.ml.nets.NetSpec's defaults


def manifest(version: int) -> ArtifactManifest:
    """A manifest of the production model's shape (the publisher does not look inside the artifact)."""
    blob = np.random.default_rng(version).bytes(25_000)
    return make_manifest(
        blob,
        line="bench",
        version=version,
        num_classes=NUM_CLASSES,
        feature_dim=FEATURE_DIM,
        input_width=SIDE * SIDE,
        probes=4,
    )


def one_by_one(publisher: CloudPublisher, wave: list[Desired]) -> None:
    for device_id, model, rollback_of in wave:
        publisher.publish_desired(device_id, model, rollback_of=rollback_of)


def together(publisher: CloudPublisher, wave: list[Desired]) -> None:
    publisher.publish_desired_many(wave)


WAYS: dict[str, Callable[[CloudPublisher, list[Desired]], None]] = {
    "one by one": one_by_one,
    "together": together,
}


def run(admin_url: str, sizes: list[int], repeats: int) -> dict[str, Any]:
    model = manifest(2)
    rows = []
    with lab(admin_url) as running:
        ring = KeyRing.open(running.workdir / "keys")
        document_bytes = len(encode(ring.sign_desired(device_id="dev-00000", manifest=model)))
        with CloudPublisher(running.cloud, ring) as publisher:
            together(publisher, [Desired("warm-up", model)])  # connection and signing key warm
            for size in sizes:
                wave = [Desired(f"dev-{size}-{i:05d}", model) for i in range(size)]
                seconds: dict[str, list[float]] = {way: [] for way in WAYS}
                for _ in range(repeats):
                    for way, publish in WAYS.items():
                        started = time.perf_counter()
                        publish(publisher, wave)
                        seconds[way].append(time.perf_counter() - started)
                medians = {way: statistics.median(values) for way, values in seconds.items()}
                rows.append({"devices": size, "seconds": seconds, "median_s": medians})
    return {
        "benchmark": "publish_wave",
        "machine": harness.machine(),
        "document_bytes": document_bytes,
        "repeats": repeats,
        "rows": rows,
    }


def show(report: dict[str, Any], console: Console) -> None:
    table = harness.table(
        f"A wave's signed desired models published to mosquitto (~{report['document_bytes']:,} B each; "
        f"median of {report['repeats']})",
        ("devices", "one by one", "together", "speed-up", "docs/s together"),
    )
    for row in report["rows"]:
        slow, fast = row["median_s"]["one by one"], row["median_s"]["together"]
        table.add_row(
            f"{row['devices']:,}",
            f"{slow * 1000:,.0f} ms",
            f"{fast * 1000:,.0f} ms",
            f"{slow / fast:.1f}×",
            f"{row['devices'] / fast:,.0f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, "publish_wave")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 495, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.sizes or min(args.sizes) < 1 or max(args.sizes) > 100_000:
        parser.error("--sizes: wave sizes between 1 and 100,000")
    if not 1 <= args.repeats <= 20:
        parser.error("--repeats: between 1 and 20")
    report = run(harness.postgres_url(), args.sizes, args.repeats)
    console = Console()
    show(report, console)
    harness.write_results(report, args.out, console)


if __name__ == "__main__":
    main()
