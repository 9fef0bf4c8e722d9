"""The telemetry retention benchmark on a small load: both tables lose the same oldest days, the
partitioned one by dropping them, the plain one returning no space until VACUUM FULL."""

from __future__ import annotations

from bench import telemetry_partitions
from tests.databases import postgres_admin_url


def test_both_tables_lose_the_oldest_days_and_only_dropping_returns_the_space() -> None:
    # Execute
    report = telemetry_partitions.run(
        postgres_admin_url(), rows=20_000, days=10, prune_days=3, devices=100, say=lambda _: None
    )

    # Assert
    partitioned, plain = report["variants"]
    assert (partitioned["partitions_dropped"], plain["partitions_dropped"]) == (3, 0)
    assert partitioned["rows_removed"] == plain["rows_removed"] == 6_000
    assert partitioned["rows_after"] == plain["rows_after"] == 14_000
    assert partitioned["bytes_after"] < partitioned["bytes_before"]
    assert plain["bytes_after"] == plain["bytes_before"]
    assert plain["bytes_after_vacuum_full"] < plain["bytes_before"]
