"""The PostgreSQL panel query, a type grafana-foundation-sdk lacks, added through the SDK's own runtime."""

from __future__ import annotations

import typing

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import plugins as cogplugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import dashboard

DATASOURCE_TYPE = "grafana-postgresql-datasource"
DATASOURCE_UID = "diredi-pg"
Format = typing.Literal["time_series", "table"]
EditorMode = typing.Literal["code", "builder"]


def datasource() -> dashboard.DataSourceRef:
    """The provisioned registry datasource (dashboards/provisioning/datasources/diredi.yaml)."""
    return dashboard.DataSourceRef(type_val=DATASOURCE_TYPE, uid=DATASOURCE_UID)


class SQLQuery(cogvariants.Dataquery):
    """A target of Grafana's PostgreSQL datasource: raw SQL, in code mode, as a table or a time series."""

    ref_id: str
    raw_sql: str
    format: Format
    raw_query: bool
    editor_mode: EditorMode
    datasource: dashboard.DataSourceRef | None
    hide: bool | None

    def __init__(
        self,
        ref_id: str = "A",
        raw_sql: str = "",
        format: Format = "table",
        raw_query: bool = True,
        editor_mode: EditorMode = "code",
        datasource: dashboard.DataSourceRef | None = None,
        hide: bool | None = None,
    ) -> None:
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format = format
        self.raw_query = raw_query
        self.editor_mode = editor_mode
        self.datasource = datasource
        self.hide = hide

    def to_json(self) -> dict[str, object]:
        payload: dict[str, object] = {
            "refId": self.ref_id,
            "rawSql": self.raw_sql,
            "format": self.format,
            "rawQuery": self.raw_query,
            "editorMode": self.editor_mode,
        }
        if self.datasource is not None:
            payload["datasource"] = self.datasource
        if self.hide is not None:
            payload["hide"] = self.hide
        return payload

    @classmethod
    def from_json(cls, data: dict[str, typing.Any]) -> typing.Self:
        args: dict[str, typing.Any] = {}
        for key, name in _FIELDS.items():
            if key in data:
                args[name] = data[key]
        if "datasource" in data:
            args["datasource"] = dashboard.DataSourceRef.from_json(data["datasource"])
        return cls(**args)


_FIELDS = {
    "refId": "ref_id",
    "rawSql": "raw_sql",
    "format": "format",
    "rawQuery": "raw_query",
    "editorMode": "editor_mode",
    "hide": "hide",
}


class SQLQueryBuilder(cogbuilder.Builder[cogvariants.Dataquery]):
    """Builds an `SQLQuery` on the registry datasource, for a panel's `with_target`."""

    def __init__(self, raw_sql: str, format: Format = "table", ref_id: str = "A") -> None:
        self._internal = SQLQuery(ref_id=ref_id, raw_sql=raw_sql, format=format, datasource=datasource())

    def build(self) -> SQLQuery:
        return self._internal


def register() -> None:
    """Teach the SDK's decoder the panel types it ships and our PostgreSQL query type (idempotent)."""
    cogplugins.register_default_plugins()
    cogruntime.register_dataquery_variant(
        cogruntime.DataqueryConfig(identifier=DATASOURCE_TYPE, from_json_hook=SQLQuery.from_json)
    )
