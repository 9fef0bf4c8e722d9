"""`diredi telemetry`: pruning on the registry (with the other registry-side commands) and the fleet's
summary through the API (with the device commands), one group."""

from cloud.cli.devices import telemetry_show
from cloud.cli.ops import telemetry_app

telemetry_app.command("show")(telemetry_show)

__all__ = ["telemetry_app"]
