"""Device labels: selectors over them ("site=lab-2,tier!=beta,!retired"), as SQL on both backends."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, String, bindparam, func, or_

from cloud.exceptions import InvalidValueError
from cloud.registry.tables import Device

MAX_LABELS = 32  # per device
MAX_TERMS = 8  # per selector
MAX_VALUE = 128  # characters of a label's key or value
# A key a selector can name: letters, digits and . _ / - (not first), as Kubernetes label keys.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


class Op(enum.Enum):
    EQUALS = "="
    DIFFERS = "!="  # or has no such label, as in Kubernetes
    HAS = "has"
    LACKS = "lacks"


@dataclass(frozen=True)
class Term:
    key: str
    op: Op
    value: str = ""


def parse_selector(text: str) -> tuple[Term, ...]:
    """The terms of a selector, comma-separated, all of which a device must match: `key=value` (also
    `key==value`), `key!=value`, `key` (has the label), `!key` (has not). InvalidValueError says why
    a selector is not one."""
    terms = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise InvalidValueError(f"selector {text!r} has an empty term")
        if "!=" in part:
            key, value = part.split("!=", 1)
            term = Term(key.strip(), Op.DIFFERS, value.strip())
        elif "=" in part:
            key, value = part.split("==", 1) if "==" in part else part.split("=", 1)
            term = Term(key.strip(), Op.EQUALS, value.strip())
        elif part.startswith("!"):
            term = Term(part[1:].strip(), Op.LACKS)
        else:
            term = Term(part, Op.HAS)
        if not _KEY.fullmatch(term.key):
            raise InvalidValueError(
                f"selector term {part!r}: a label key is 1-128 letters, digits and . _ / - (not first)"
            )
        if len(term.value) > MAX_VALUE or any(c in term.value for c in "=!\x00"):
            raise InvalidValueError(
                f"selector term {part!r}: the value is at most {MAX_VALUE} characters, no = or !"
            )
        terms.append(term)
    if len(terms) > MAX_TERMS:
        raise InvalidValueError(f"a selector has at most {MAX_TERMS} terms, not {len(terms)}")
    return tuple(terms)


def shape(terms: tuple[Term, ...]) -> tuple[Op, ...]:
    """What a statement built for `terms` depends on (their keys and values are bound parameters)."""
    return tuple(term.op for term in terms)


def where(ops: tuple[Op, ...], dialect: str) -> list[ColumnElement[bool]]:
    """The conditions of a selector of this shape on `dialect`, with parameters `label_key_<n>` and
    `label_value_<n>` (see `bound`)."""
    conditions = []
    for n, op in enumerate(ops):
        value = _label(n, dialect)
        if op is Op.EQUALS:
            conditions.append(value == bindparam(f"label_value_{n}", type_=String()))
        elif op is Op.DIFFERS:
            conditions.append(or_(value.is_(None), value != bindparam(f"label_value_{n}", type_=String())))
        elif op is Op.HAS:
            conditions.append(value.is_not(None))
        else:
            conditions.append(value.is_(None))
    return conditions


def bound(terms: tuple[Term, ...], dialect: str) -> dict[str, Any]:
    """The parameter values of `where` for `terms`."""
    params: dict[str, Any] = {}
    for n, term in enumerate(terms):
        # SQLite's json_extract takes a path; the key pattern leaves nothing to escape in it.
        params[f"label_key_{n}"] = f'$."{term.key}"' if dialect == "sqlite" else term.key
        if term.op in (Op.EQUALS, Op.DIFFERS):
            params[f"label_value_{n}"] = term.value
    return params


def _label(n: int, dialect: str) -> ColumnElement[Any]:
    key = bindparam(f"label_key_{n}", type_=String())
    if dialect == "sqlite":
        return func.json_extract(Device.labels, key)
    return Device.labels.op("->>", return_type=String())(key)  # json and jsonb alike


def merged(labels: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """`labels` with `changes` applied: a value sets a label, None removes it."""
    result = dict(labels)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    if len(result) > MAX_LABELS:
        raise InvalidValueError(f"a device has at most {MAX_LABELS} labels; this would give it {len(result)}")
    return result
