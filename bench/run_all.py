"""`make bench`: runs every benchmark in turn."""

from bench import (
    api_listing,
    device_daemon,
    fleet_connections,
    ingest_memory,
    ingest_throughput,
    learning_loop,
    pipeline_cycle,
    publish_wave,
    rollout_fleet,
    telemetry_partitions,
)

if __name__ == "__main__":
    api_listing.main([])
    learning_loop.main([])
    pipeline_cycle.main([])
    ingest_throughput.main([])
    ingest_memory.main([])
    device_daemon.main([])
    publish_wave.main([])
    telemetry_partitions.main([])
    # These exit non-zero when one of their checks fails; each runs whatever the other found.
    failed = []
    for checked in (rollout_fleet, fleet_connections):
        try:
            checked.main([])
        except SystemExit as exc:
            failed.append(str(exc))
    if failed:
        raise SystemExit("; ".join(failed))
