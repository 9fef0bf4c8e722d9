"""The macro expander gives what Grafana gives: cases from Grafana's own PostgreSQL macro tests, and more."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.dashboards.grafana_macros import (
    MacroError,
    TimeRange,
    Variable,
    expand_macros,
    format_interval,
    go_float,
    interpolate,
    parse_interval,
    rfc3339_nano,
    strip_sql_comments,
)

START = datetime(2018, 4, 12, 18, 0, tzinfo=UTC)
RANGE = TimeRange(START, START + timedelta(minutes=5))


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("select $__time(time_column)", 'select time_column AS "time"'),
        ("select min($__time(time_column))", 'select min(time_column AS "time")'),
        ("select $__timeEpoch(t)", 'select extract(epoch from t) as "time"'),
        (
            "WHERE $__timeFilter(time_column)",
            "WHERE time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'",
        ),
        ("select $__timeFrom()", "select '2018-04-12T18:00:00Z'"),
        ("select $__timeTo()", "select '2018-04-12T18:05:00Z'"),
        ("SELECT $__timeGroup(time_column,'5m')", "SELECT floor(extract(epoch from time_column)/300)*300"),
        ("$__timeGroup(time_column , '5m')", "floor(extract(epoch from time_column)/300)*300"),
        (
            "SELECT $__timeGroupAlias(time_column,'5m')",
            'SELECT floor(extract(epoch from time_column)/300)*300 AS "time"',
        ),
        (  # before Grafana 5.3 $__timeGroup aliased itself; a comma right after it still asks for that
            "SELECT $__timeGroup(time_column,'5m'), value",
            'SELECT floor(extract(epoch from time_column)/300)*300 AS "time", value',
        ),
        (
            "SELECT $__timeGroup(time_column,'5m') as time, value",
            "SELECT floor(extract(epoch from time_column)/300)*300 as time, value",
        ),
        ("SELECT $__timeGroup(t, 5m, previous)", "SELECT floor(extract(epoch from t)/300)*300"),
        ("select $__unixEpochFilter(time)", "select time >= 1523556000 AND time <= 1523556300"),
        (
            "select $__unixEpochNanoFilter(time)",
            "select time >= 1523556000000000000 AND time <= 1523556300000000000",
        ),
        ("select $__unixEpochNanoFrom()", "select 1523556000000000000"),
        ("select $__unixEpochNanoTo()", "select 1523556300000000000"),
        (
            "SELECT $__unixEpochGroupAlias(time_column+time_adjustment,'5m')",
            'SELECT floor((time_column+time_adjustment)/300)*300 AS "time"',
        ),
        ("SELECT 1 -- $__nosuchmacro(x)\n", "SELECT 1 \n"),  # comments are stripped before expansion
    ],
)
def test_macros_expand_as_in_grafana(sql: str, expected: str) -> None:
    assert expand_macros(sql, RANGE) == expected


def test_fractional_seconds_keep_go_rfc3339_nano_form() -> None:
    start = datetime(1960, 2, 1, 7, 0, 0, 500_000, tzinfo=UTC)
    end = datetime(1980, 2, 3, 8, 0, 0, 500_000, tzinfo=UTC)

    sql = expand_macros("WHERE $__timeFilter(t)", TimeRange(start, end))

    assert sql == "WHERE t BETWEEN '1960-02-01T07:00:00.5Z' AND '1980-02-03T08:00:00.5Z'"
    assert rfc3339_nano(datetime(2024, 1, 2, 3, 4, 5, 120_000, tzinfo=UTC)) == "2024-01-02T03:04:05.12Z"


@pytest.mark.parametrize(
    "sql", ["$__nosuchmacro(x)", "$__timeGroup(t)", "$__timeGroup(t, soon)", "$__timeGroup(t, 1m, lots)"]
)
def test_macros_grafana_refuses_are_refused(sql: str) -> None:
    with pytest.raises(MacroError):
        expand_macros(sql, RANGE)


def test_interpolate_replaces_variables_and_intervals_before_macros() -> None:
    sql = (
        "SELECT $__timeGroupAlias(at, $__interval), $__interval_ms, $__unixEpochFrom(), $__from\n"
        "FROM t WHERE d = '$device' AND e = '${device}' AND f IN ($many) AND g = [[device]]"
        " AND $__timeFilter(at)"
    )
    variables = {"device": Variable("cam-'1"), "many": Variable(["a", "b"], multi=True)}

    expanded = interpolate(sql, RANGE, timedelta(minutes=1), variables)

    assert expanded == (
        'SELECT floor(extract(epoch from at)/60)*60 AS "time", 60000, 1523556000, 1523556000000\n'
        "FROM t WHERE d = 'cam-''1' AND e = 'cam-''1' AND f IN ('a','b') AND g = cam-''1"
        " AND at BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    )


def test_unknown_variables_are_left_as_written() -> None:
    assert interpolate("SELECT '$nobody'", RANGE, timedelta(seconds=10)) == "SELECT '$nobody'"


@pytest.mark.parametrize(
    ("interval", "text"),
    [
        (timedelta(milliseconds=500), "500ms"),
        (timedelta(seconds=90), "1m"),
        (timedelta(hours=5), "5h"),
        (timedelta(days=400), "1y"),
        (timedelta(0), "1ms"),
    ],
)
def test_intervals_format_as_gtime(interval: timedelta, text: str) -> None:
    assert format_interval(interval) == text


@pytest.mark.parametrize(
    ("text", "interval"),
    [
        ("5m", timedelta(minutes=5)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5s", timedelta(seconds=1.5)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
    ],
)
def test_intervals_parse_as_gtime(text: str, interval: timedelta) -> None:
    assert parse_interval(text) == interval


def test_calendar_intervals_count_from_now_like_go_add_date() -> None:
    jan31 = datetime(2023, 1, 31, tzinfo=UTC)

    assert parse_interval("1M", jan31) == timedelta(days=31)  # Go: Jan 31 + 1 month = Mar 3
    assert parse_interval("1y", jan31) == timedelta(days=365)


@pytest.mark.parametrize(("value", "text"), [(60.0, "60"), (0.5, "0.5"), (1e6, "1e+06"), (1e-5, "1e-05")])
def test_group_seconds_print_as_go_percent_v(value: float, text: str) -> None:
    assert go_float(value) == text


def test_comment_stripping_respects_quotes() -> None:
    sql = "SELECT '--a', \"/*b*/\", $$ -- c $$, $t$ /* d */ $t$ -- e\nFROM x /* f */"

    assert strip_sql_comments(sql) == "SELECT '--a', \"/*b*/\", $$ -- c $$, $t$ /* d */ $t$ \nFROM x "
