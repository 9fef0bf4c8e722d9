"""Check dashboard JSON against grafana-foundation-sdk's Grafana types and provisioning's needs.

`python -m dashboards.validate [FILE...]` (default: every file in dashboards/json) prints the problems
and exits 1 if there are any. Three layers:

1. Decode with the SDK (`Dashboard.from_json`, with its panel plugins and our PostgreSQL query type
   registered) and encode again: a key the SDK's types do not have is dropped on the way, so any key
   of the file missing from the round trip is misspelt or unknown.
2. Walk the decoded objects against the SDK's type annotations: `gridPos.h` must be an int, an enum
   field one of its values, a `Literal` one of its choices, and so on.
3. What Grafana needs beyond the types: known panel types, a provisioned datasource on every panel and
   the panel's own on each of its targets, raw SQL (registry) or PromQL (Prometheus) in every target,
   unique ids and refIds, grid positions inside the 24 columns and
   not overlapping, no panels hidden in an expanded row, template variables that exist.
"""

from __future__ import annotations

import enum
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.promql import PROMETHEUS_TYPE, PROMETHEUS_UID
from dashboards.sqlquery import DATASOURCE_TYPE, DATASOURCE_UID, register

GRID_COLUMNS = 24
DATASOURCE = {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}
PROMETHEUS = {"type": PROMETHEUS_TYPE, "uid": PROMETHEUS_UID}
QUERY_FIELD = {"grafana-postgresql-datasource": "rawSql", "prometheus": "expr"}  # by datasource type
UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
# Grafana's template variable syntaxes: $name, ${name}, ${name:format}, [[name]].
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?:[.:][^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]")
JSON_DIR = Path(__file__).resolve().parent / "json"


def validate(data: Any) -> list[str]:
    """Every problem found in one dashboard's JSON (an empty list: valid)."""
    if not isinstance(data, dict):
        return ["a dashboard is a JSON object"]
    register()
    try:
        model = dm.Dashboard.from_json(data)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        return [f"does not decode as a Grafana dashboard: {error!r}"]
    encoded = json.loads(json.dumps(model, cls=JSONEncoder))
    return lost_keys(data, encoded, "$") + type_errors(model, "$") + grafana_errors(data)


def lost_keys(original: Any, decoded: Any, path: str) -> list[str]:
    """The places where `original` has something the SDK's types could not carry through."""
    if isinstance(original, dict):
        if not isinstance(decoded, dict):
            return [f"{path}: an object was expected to survive decoding"]
        errors = []
        for key, value in original.items():
            if key not in decoded:
                errors.append(f"{path}.{key}: not a field of this Grafana type (misspelt or unknown)")
            else:
                errors.extend(lost_keys(value, decoded[key], f"{path}.{key}"))
        return errors
    if isinstance(original, list):
        if not isinstance(decoded, list) or len(decoded) != len(original):
            return [f"{path}: the list did not survive decoding"]
        return [
            e
            for i, (o, d) in enumerate(zip(original, decoded, strict=True))
            for e in lost_keys(o, d, f"{path}[{i}]")
        ]
    if original != decoded or type(original) is not type(decoded):
        return [f"{path}: {original!r} decodes as {decoded!r}"]
    return []


def _is_model(value: Any) -> bool:
    # SDK models (and our SQLQuery) are the objects with a to_json and annotated fields.
    return callable(getattr(value, "to_json", None)) and bool(getattr(type(value), "__annotations__", None))


def type_errors(obj: Any, path: str) -> list[str]:
    """Fields of a decoded SDK object whose value does not match the SDK's annotation."""
    hints = typing.get_type_hints(type(obj))
    return [e for name, hint in hints.items() for e in _check(getattr(obj, name), hint, f"{path}.{name}")]


def _check(value: Any, hint: Any, path: str) -> list[str]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is object:
        return type_errors(value, path) if _is_model(value) else []
    if origin is typing.Union or origin is types.UnionType:
        results = [_check(value, arg, path) for arg in args]
        if any(not r for r in results):
            return []
        nested = [r for r in results if not any(e.startswith(f"{path}:") for e in r)]
        return nested[0] if nested else [f"{path}: {value!r} is not {_name(hint)}"]
    if origin is typing.Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
        return [] if ok else [f"{path}: {value!r} is not one of {list(args)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [e for i, item in enumerate(value) for e in _check(item, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object"]
        return [e for k, item in value.items() for e in _check(item, args[1], f"{path}.{k}")]
    if hint is type(None):
        return [] if value is None else [f"{path}: {value!r} is not null"]
    if not isinstance(hint, type):
        return []  # a form the SDK does not use: nothing to check
    return _check_class(value, hint, path)


def _check_class(value: Any, hint: type, path: str) -> list[str]:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    elif issubclass(hint, enum.Enum):
        ok = not isinstance(value, bool) and value in {m.value for m in hint}
        if not ok:
            return [f"{path}: {value!r} is not one of {[m.value for m in hint]}"]
    elif isinstance(value, hint):
        return type_errors(value, path) if _is_model(value) else []
    else:
        ok = False
    return [] if ok else [f"{path}: {value!r} is not {_name(hint)}"]


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, with the panels nested in (collapsed) rows after their row."""
    for panel in panels:
        yield panel
        yield from panel.get("panels") or []


def grafana_errors(data: dict[str, Any]) -> list[str]:
    """What Grafana and the provisioning need beyond the SDK's types."""
    errors = []
    if not UID.match(str(data.get("uid", ""))):
        errors.append("$.uid: 1 to 40 letters, digits, '-' or '_' are needed to provision a dashboard")
    if not data.get("title"):
        errors.append("$.title: a dashboard needs a title")
    panels = data.get("panels") or []
    if not panels:
        errors.append("$.panels: the dashboard has no panels")
    variables = {v.get("name") for v in (data.get("templating") or {}).get("list") or []}
    errors.extend(_variable_errors(data))
    ids: set[Any] = set()
    for panel in walk(panels):
        where = f"panel {panel.get('id')!r} ({panel.get('title')!r})"
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            errors.append(f"{where}: panel ids must be unique integers")
        ids.add(panel.get("id"))
        errors.extend(f"{where}: {e}" for e in _panel_errors(panel, variables))
    errors.extend(_overlaps(panels, "the dashboard"))
    for row in (p for p in panels if p.get("type") == "row"):
        errors.extend(_overlaps(row.get("panels") or [], f"row {row.get('title')!r}"))
    return errors


def _variable_errors(data: dict[str, Any]) -> list[str]:
    errors = []
    for variable in (data.get("templating") or {}).get("list") or []:
        name = variable.get("name")
        if variable.get("type") == "query":
            if variable.get("datasource") != DATASOURCE:
                errors.append(f"variable {name!r}: its datasource must be {DATASOURCE}")
            if not isinstance(variable.get("query"), str) or not variable["query"].strip():
                errors.append(f"variable {name!r}: a query variable needs its SQL as `query`")
    return errors


def _panel_errors(panel: dict[str, Any], variables: set[Any]) -> list[str]:
    errors = _grid_errors(panel.get("gridPos"))
    kind = panel.get("type")
    if kind == "row":
        if not panel.get("collapsed") and panel.get("panels"):
            errors.append("an expanded row must not nest panels (Grafana shows only a collapsed row's)")
        return errors
    if kind not in cogruntime.Runtime().panelcfg_variants:
        errors.append(f"unknown panel type {kind!r}")
    source = panel.get("datasource")
    if source not in (DATASOURCE, PROMETHEUS):
        errors.append(f"the panel's datasource must be {DATASOURCE} or {PROMETHEUS}")
        source = DATASOURCE
    targets = panel.get("targets")
    if not isinstance(targets, list) or not targets:
        return [*errors, "a panel needs at least one target"]
    refs = [t.get("refId") for t in targets if isinstance(t, dict)]
    if len(set(refs)) != len(targets) or not all(refs):
        errors.append("every target needs its own refId")
    for target in targets:
        if not isinstance(target, dict):
            errors.append("a target is an object")
            continue
        errors.extend(_target_errors(target, source, variables))
    return errors


def _target_errors(target: dict[str, Any], source: dict[str, str], variables: set[Any]) -> list[str]:
    ref, errors = target.get("refId"), []
    if target.get("datasource") != source:
        errors.append(f"target {ref}: its datasource must be the panel's, {source}")
    field = QUERY_FIELD[source["type"]]
    text = target.get(field)
    if not isinstance(text, str) or not text.strip():
        return [*errors, f"target {ref}: {field} is empty"]
    if field == "rawSql" and (target.get("rawQuery") is not True or target.get("editorMode") != "code"):
        errors.append(f"target {ref}: raw SQL needs rawQuery true and editorMode 'code'")
    if field == "expr" and (target.get("range") is not True or target.get("editorMode") != "code"):
        errors.append(f"target {ref}: PromQL needs range true and editorMode 'code'")
    for match in VARIABLE.finditer(text):
        name = next(g for g in match.groups() if g)
        if not name.startswith("__") and name not in variables:
            errors.append(f"target {ref}: ${name} is not a template variable of this dashboard")
    return errors


def _grid_errors(grid: Any) -> list[str]:
    if not isinstance(grid, dict) or not all(isinstance(grid.get(k), int) for k in "hwxy"):
        return ["gridPos needs integer h, w, x and y"]
    if grid["h"] < 1 or grid["w"] < 1 or grid["x"] < 0 or grid["y"] < 0:
        return [f"gridPos {grid} has a negative position or an empty size"]
    if grid["x"] + grid["w"] > GRID_COLUMNS:
        return [f"gridPos {grid} runs past the grid's {GRID_COLUMNS} columns"]
    return []


def _overlaps(panels: list[dict[str, Any]], where: str) -> list[str]:
    boxes = [(p.get("title"), p["gridPos"]) for p in panels if not _grid_errors(p.get("gridPos"))]
    errors = []
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1 :]:
            if (
                a["x"] < b["x"] + b["w"]
                and b["x"] < a["x"] + a["w"]
                and a["y"] < b["y"] + b["h"]
                and b["y"] < a["y"] + a["h"]
            ):
                errors.append(f"{where}: panels {title_a!r} and {title_b!r} overlap")
    return errors


def main(argv: list[str] | None = None) -> int:
    """Validate the given files (default: dashboards/json/*.json); exit 1 on any problem."""
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or sorted(JSON_DIR.glob("*.json"))
    failed = False
    for path in paths:
        for error in validate(json.loads(path.read_text(encoding="utf-8"))):
            sys.stderr.write(f"{path}: {error}\n")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
