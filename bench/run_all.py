"""`make bench`: runs every benchmark in turn."""

from bench import api_listing, device_daemon, fleet_connections, ingest_throughput, learning_loop

if __name__ == "__main__":
    api_listing.main([])
    learning_loop.main()
    ingest_throughput.main([])
    device_daemon.main([])
    fleet_connections.main([])  # last: it exits non-zero when a presence or telemetry check fails
