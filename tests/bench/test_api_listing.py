"""The API listing benchmark's reading of wrk and pgbench, and the pgbench script it makes from the SQL."""

from __future__ import annotations

import pytest
from rich.progress import Progress

from bench import api_listing
from tests.databases import postgres_admin_url
from testsupport.postgres import scratch_database

PGBENCH_15 = """pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: /tmp/tmpabcd/listing.sql
scaling factor: 1
query mode: prepared
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 15 s
number of transactions actually processed: 24382
number of failed transactions: 0 (0.000%)
latency average = 9.834 ms
initial connection time = 93.282 ms
tps = 1626.962310 (without initial connection time)
"""

WRK = """Running 15s test @ http://127.0.0.1:40123
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    35.34ms   24.17ms 322.26ms   77.45%
    Req/Sec   240.92     87.02   440.00     65.00%
  Latency Distribution
     50%   31.49ms
     75%   45.08ms
     90%   61.51ms
     99%    1.12s
  4827 requests in 10.07s, 133.59MB read
Requests/sec:    479.26
Transfer/sec:     13.26MB
"""

PAGE_SQL = (
    "SELECT device.id, (SELECT count(*) AS count_1 \nFROM (SELECT device.id AS id \nFROM device) AS anon_1)"
    " AS total_matching_rows \nFROM device ORDER BY device.id \n LIMIT %(page_limit)s::INTEGER"
    " OFFSET %(page_offset)s::INTEGER"
)


def test_pgbench_figures_are_read_from_its_report() -> None:
    # Execute
    figures = api_listing.parse_pgbench(PGBENCH_15)

    # Assert
    assert figures == {"tps": 1626.962310, "latency_avg_ms": 9.834, "transactions": 24382, "failed": 0}


def test_a_pgbench_run_with_failed_transactions_is_refused() -> None:
    # Prepare
    failing = PGBENCH_15.replace("failed transactions: 0 (0.000%)", "failed transactions: 3 (0.012%)")

    # Execute / Assert
    with pytest.raises(RuntimeError, match="failed transactions"):
        api_listing.parse_pgbench(failing)


@pytest.mark.parametrize(
    "output",
    [
        "",
        "pgbench: error: connection to server failed\n",
        PGBENCH_15.replace("tps = 1626.962310 (without initial connection time)\n", ""),
        PGBENCH_15.replace("processed: 24382", "processed: 0"),
    ],
    ids=["empty", "error", "no tps", "no transactions"],
)
def test_a_pgbench_report_without_its_figures_is_an_error(output: str) -> None:
    # Execute / Assert
    with pytest.raises(RuntimeError, match="cannot read pgbench"):
        api_listing.parse_pgbench(output)


def test_a_pgbench_report_before_version_15_counts_no_failures() -> None:
    # Prepare
    older = PGBENCH_15.replace("number of failed transactions: 0 (0.000%)\n", "")

    # Execute
    figures = api_listing.parse_pgbench(older)

    # Assert
    assert figures["failed"] == 0 and figures["tps"] == 1626.962310


def test_wrk_latencies_are_read_in_milliseconds_whatever_their_unit() -> None:
    # Execute
    figures = api_listing.parse_wrk(WRK)

    # Assert
    assert figures == {
        "p50_ms": 31.49,
        "p90_ms": 61.51,
        "p99_ms": 1120.0,
        "requests_per_s": 479.26,
        "requests": 4827,
    }


def test_the_pgbench_script_sends_the_captured_sql_at_a_random_page() -> None:
    # Prepare
    captured = [(PAGE_SQL, {"page_limit": 100, "page_offset": 100})]

    # Execute
    script = api_listing.pgbench_script(captured, pages=100)

    # Assert
    lines = script.splitlines()
    assert lines[0] == "\\set page_offset random(0, 99) * 100"
    assert lines[1] == "\\set page_limit 100"
    assert lines[2] == (
        "SELECT device.id, (SELECT count(*) AS count_1 FROM (SELECT device.id AS id FROM device) AS anon_1)"
        " AS total_matching_rows FROM device ORDER BY device.id LIMIT :page_limit::INTEGER"
        " OFFSET :page_offset::INTEGER;"
    )
    assert len(lines) == 3


def test_a_parameter_pgbench_cannot_hold_is_refused() -> None:
    # Prepare
    captured = [("SELECT 1 WHERE %(cohort)s = 'x'", {"cohort": "kitchen"})]

    # Execute / Assert
    with pytest.raises(RuntimeError, match="cohort"):
        api_listing.pgbench_script(captured, pages=1)


@pytest.mark.parametrize(("fraction", "expected"), [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0), (0.001, 1.0)])
def test_percentiles_are_taken_by_nearest_rank(fraction: float, expected: float) -> None:
    # Prepare
    ordered = [float(n) for n in range(1, 101)]

    # Execute / Assert
    assert api_listing.nearest_rank(ordered, fraction) == expected


def test_pgbench_runs_the_listing_sql_the_registry_sends() -> None:
    # The whole path on a real PostgreSQL: seed, capture the page's SQL at the driver, run it in pgbench.
    try:
        api_listing.pgbench_binary()
    except SystemExit:
        pytest.skip("pgbench is not installed (scripts/services.sh postgres)")
    with scratch_database(postgres_admin_url(), prefix="diredi_test") as url:
        # Prepare
        api_listing.seed(url, 300)

        # Execute
        statements = api_listing.listing_statements(url)
        script = api_listing.pgbench_script(statements, pages=3)
        with Progress(disable=True) as progress:
            figures = api_listing.pgbench(url, script, clients=2, seconds=1, progress=progress)

    # Assert
    assert len(statements) == 1  # the page and its total in one round trip
    assert "count(*)" in statements[0][0] and "LIMIT" in statements[0][0]
    assert figures["transactions"] > 0 and figures["failed"] == 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
