"""Grafana's PostgreSQL query interpolation, ported so the tests can run dashboard SQL as Grafana would.

Three steps, in Grafana's order:
1. the frontend's template variables (public/app/features/plugins/sql/datasource/SqlDatasource.ts,
   `interpolateVariable`, through templateSrv's variable regex), built-ins `$__interval(_ms)`,
   `$__from` and `$__to` included;
2. the backend's global substitutions (pkg/tsdb/grafana-postgresql-datasource/sqleng, `Interpolate`):
   `$__interval_ms`, `$__interval`, `$__unixEpochFrom()`, `$__unixEpochTo()`;
3. the PostgreSQL macro engine (pkg/tsdb/grafana-postgresql-datasource/macros.go, without TimescaleDB):
   SQL comments stripped, then every `$__macro(args)`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

# templateSrv's regex: $var | [[var]] | [[var:fmt]] | ${var} | ${var.field} | ${var:fmt}
TEMPLATE_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)
MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")  # macros.go: `\$` + rsIdentifier + `\(([^\)]*)\)`
DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")  # $$ or $tag$ opens a dollar-quoted string
DATE_UNIT = re.compile(r"^(\d+)([dwMy])$")
GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class MacroError(ValueError):
    """A macro Grafana itself would refuse (unknown, or with bad arguments)."""


@dataclass(frozen=True)
class TimeRange:
    """The dashboard's time range, as timezone-aware datetimes."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class Variable:
    """A template variable's current value (a list when several are selected)."""

    value: str | list[str]
    multi: bool = False
    include_all: bool = False


def interpolate(
    sql: str, time_range: TimeRange, interval: timedelta, variables: Mapping[str, Variable] | None = None
) -> str:
    """`sql` as Grafana's PostgreSQL datasource would send it to the database."""
    sql = replace_variables(sql, variables or {}, time_range, interval)
    sql = sql.replace("$__interval_ms", str(_milliseconds(interval)))
    sql = sql.replace("$__interval", format_interval(interval))
    sql = sql.replace("$__unixEpochFrom()", str(_unix(time_range.start)))
    sql = sql.replace("$__unixEpochTo()", str(_unix(time_range.end)))
    return expand_macros(sql, time_range)


# -- 1. the frontend: template variables ------------------------------------------------------------


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def format_value(variable: Variable, fmt: str | None) -> str:
    """SqlDatasource.interpolateVariable, or one of templateSrv's named formats."""
    values = variable.value if isinstance(variable.value, list) else [variable.value]
    if fmt is None:
        if isinstance(variable.value, str) and not (variable.multi or variable.include_all):
            return variable.value.replace("'", "''")
        return ",".join(_quote_literal(v) for v in values)
    formats: dict[str, Callable[[list[str]], str]] = {
        "raw": ",".join,
        "csv": ",".join,
        "sqlstring": lambda vs: ",".join(_quote_literal(v) for v in vs),
        "singlequote": lambda vs: ",".join("'" + v.replace("'", "\\'") + "'" for v in vs),
        "doublequote": lambda vs: ",".join('"' + v.replace('"', '\\"') + '"' for v in vs),
    }
    if fmt not in formats:
        raise MacroError(f"variable format {fmt!r} is not ported to these tests")
    return formats[fmt](values)


def replace_variables(
    sql: str, variables: Mapping[str, Variable], time_range: TimeRange, interval: timedelta
) -> str:
    """templateSrv.replace: known variables are substituted, anything else is left as written."""
    builtins = {
        "__interval": format_interval(interval),
        "__interval_ms": str(_milliseconds(interval)),
        "__from": str(_unix_ms(time_range.start)),
        "__to": str(_unix_ms(time_range.end)),
    }

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if name in builtins:
            return builtins[name]
        if name in variables:
            return format_value(variables[name], fmt)
        return match.group(0)

    return TEMPLATE_VARIABLE.sub(substitute, sql)


# -- 2. Go's time formats ---------------------------------------------------------------------------


def format_interval(interval: timedelta) -> str:
    """gtime.FormatInterval: the interval in its largest whole unit, e.g. `1m`, `30s`, `2h`."""
    for unit, size in (("y", timedelta(days=365)), ("d", timedelta(days=1)), ("h", timedelta(hours=1))):
        if interval >= size:
            return f"{interval // size}{unit}"
    for unit, size in (
        ("m", timedelta(minutes=1)),
        ("s", timedelta(seconds=1)),
        ("ms", timedelta(milliseconds=1)),
    ):
        if interval >= size:
            return f"{interval // size}{unit}"
    return "1ms"


def _add_months(moment: datetime, months: int) -> datetime:
    # Go's AddDate normalises an overflowing day into the next month (Jan 31 + 1 month = Mar 3).
    year, month = divmod(moment.month - 1 + months, 12)
    first = date(year + moment.year, month + 1, 1)
    return moment.replace(year=first.year, month=first.month, day=1) + timedelta(days=moment.day - 1)


def parse_interval(text: str, now: datetime | None = None) -> timedelta:
    """gtime.ParseInterval: `5m`, `1h30m`, `500ms` (Go durations) or `2d`, `1w`, `1M`, `1y` (calendar)."""
    match = DATE_UNIT.match(text)
    if match:
        count, unit = int(match.group(1)), match.group(2)
        if unit in "dw":
            return timedelta(days=count * (7 if unit == "w" else 1))
        start = now or datetime.now(UTC)
        return _add_months(start, count * (12 if unit == "y" else 1)) - start
    body = text.lstrip("+-")
    if body == "0":
        return timedelta(0)
    parts = GO_DURATION.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise MacroError(f"time: invalid duration {text!r}")
    seconds = sum(float(n) * GO_UNITS[u] for n, u in parts)
    return timedelta(seconds=-seconds if text.startswith("-") else seconds)


def rfc3339_nano(moment: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: trailing zeros of the fraction dropped, `Z` for the zone."""
    moment = moment.astimezone(UTC)
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def go_float(value: float) -> str:
    """Go's `%v` of a float64: the shortest digits, in %e form below 1e-4 or from 1e6 (60, 0.5, 1e+06)."""
    number = Decimal(repr(value)).normalize()
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # a float is finite here: intervals are positive durations
    power = len(digits) + exponent - 1
    if power < -4 or power >= 6:
        mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
        return f"{'-' if sign else ''}{mantissa}e{'+' if power >= 0 else '-'}{abs(power):02d}"
    return f"{number:f}"


def _unix(moment: datetime) -> int:
    return calendar.timegm(moment.astimezone(UTC).timetuple())


def _unix_ms(moment: datetime) -> int:
    return _unix(moment) * 1000 + moment.microsecond // 1000


def _unix_nano(moment: datetime) -> int:
    return _unix(moment) * 1_000_000_000 + moment.microsecond * 1000


def _milliseconds(interval: timedelta) -> int:
    return interval // timedelta(milliseconds=1)


# -- 3. the backend: the PostgreSQL macro engine ----------------------------------------------------


def _consume_quoted(sql: str, i: int, quote: str, out: list[str]) -> int:
    out.append(quote)
    i += 1
    while i < len(sql):
        out.append(sql[i])
        i += 1
        if sql[i - 1] == quote:
            if i < len(sql) and sql[i] == quote:  # a doubled quote is an escaped one
                out.append(sql[i])
                i += 1
            else:
                break
    return i


def strip_sql_comments(sql: str) -> str:
    """macros.go stripSQLComments: drop `--` and `/* */` comments outside quotes and dollar quotes."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        char = sql[i]
        if char == "$":
            tag = DOLLAR_QUOTE.match(sql, i)
            if tag:
                closing = tag.group(0)
                end = sql.find(closing, i + len(closing))
                stop = n if end < 0 else end + len(closing)
                out.append(sql[i:stop])
                i = stop
            else:
                out.append(char)
                i += 1
        elif char in "'\"":
            i = _consume_quoted(sql, i, char, out)
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            # Go's loop stops one short on an unclosed comment, so its last character survives.
            i = max(i + 2, n - 1) if end < 0 else end + 2
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        else:
            out.append(char)
            i += 1
    return "".join(out)


def _group_seconds(name: str, args: list[str]) -> str:
    if len(args) < 2:
        raise MacroError(f"macro {name} needs time column and interval and optional fill value")
    try:
        interval = parse_interval(args[1].strip("'"))
    except MacroError as error:
        raise MacroError(f"error parsing interval {args[1]}") from error
    if interval <= timedelta(0):
        raise MacroError(f"interval must be positive, got {args[1]}")
    if len(args) == 3 and args[2] not in ("NULL", "previous"):
        try:  # sqleng.SetupFillmode: NULL, previous or a number (it changes the response, not the SQL)
            float(args[2])
        except ValueError as error:
            raise MacroError(f"error parsing fill value {args[2]}") from error
    return go_float(interval.total_seconds())


def evaluate_macro(name: str, args: list[str], time_range: TimeRange) -> str:
    """postgresMacroEngine.evaluateMacro, for a PostgreSQL datasource without TimescaleDB."""
    start, end = rfc3339_nano(time_range.start), rfc3339_nano(time_range.end)
    column = args[0] if args else ""
    if (
        name in ("__time", "__timeEpoch", "__timeFilter", "__unixEpochFilter", "__unixEpochNanoFilter")
        and not args
    ):
        raise MacroError(f"missing time column argument for macro {name}")
    if name == "__time":
        return f'{column} AS "time"'
    if name == "__timeEpoch":
        return f'extract(epoch from {column}) as "time"'
    if name == "__timeFilter":
        return f"{column} BETWEEN '{start}' AND '{end}'"
    if name == "__timeFrom":
        return f"'{start}'"
    if name == "__timeTo":
        return f"'{end}'"
    if name in ("__timeGroup", "__timeGroupAlias"):
        seconds = _group_seconds(name, args)
        group = f"floor(extract(epoch from {column})/{seconds})*{seconds}"
        return group + (' AS "time"' if name == "__timeGroupAlias" else "")
    if name == "__unixEpochFilter":
        return f"{column} >= {_unix(time_range.start)} AND {column} <= {_unix(time_range.end)}"
    if name == "__unixEpochNanoFilter":
        return f"{column} >= {_unix_nano(time_range.start)} AND {column} <= {_unix_nano(time_range.end)}"
    if name == "__unixEpochNanoFrom":
        return str(_unix_nano(time_range.start))
    if name == "__unixEpochNanoTo":
        return str(_unix_nano(time_range.end))
    if name in ("__unixEpochGroup", "__unixEpochGroupAlias"):
        seconds = _group_seconds(name, args)
        group = f"floor(({column})/{seconds})*{seconds}"
        return group + (' AS "time"' if name == "__unixEpochGroupAlias" else "")
    raise MacroError(f"unknown macro {name!r}")


def expand_macros(sql: str, time_range: TimeRange) -> str:
    """postgresMacroEngine.Interpolate: every `$__name(args)` of the (comment-stripped) SQL expanded."""
    sql = strip_sql_comments(sql)

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        # Before Grafana 5.3 $__timeGroup added the alias itself; a ',' right after it still means that.
        if name == "__timeGroup":
            first = sql.find(match.group(0))
            after = first + len(match.group(0))
            if first >= 0 and after < len(sql) and sql[after] == ",":
                name = "__timeGroupAlias"
        args = [a.strip(" ") for a in match.group(2).split(",")]
        return evaluate_macro(name, args, time_range)

    return MACRO.sub(expand, sql)
