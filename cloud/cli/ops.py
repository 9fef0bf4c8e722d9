"""Operator commands around the registry: migrations, API keys, signing keys, telemetry, the API server."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from cloud.cli.common import fail, infrastructure_failure, load_settings, migrated_engine
from cloud.exceptions import CloudError, ExportGaveUp
from cloud.registry.tables import Role
from cloud.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cloud.signing import KeyRing

console = Console()
err = Console(stderr=True)

db_app = typer.Typer(help="Create or migrate the registry's schema (Alembic).")
apikey_app = typer.Typer(help="Operator API keys.")
keys_app = typer.Typer(help="The cloud's Ed25519 signing keys.")
telemetry_app = typer.Typer(help="The telemetry time series.")


def _migrate(revision: str, *, up: bool) -> None:
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from cloud.registry import migrate
    from cloud.registry.db import make_engine

    settings = load_settings()
    try:
        engine = make_engine(settings.resolved_database_url)
        (migrate.upgrade if up else migrate.downgrade)(engine, revision)
        console.print(
            f"registry at revision {migrate.current(engine) or 'base (empty)'} "
            f"({engine.url.render_as_string()})"
        )
    except SQLAlchemyError as exc:
        if (described := infrastructure_failure(exc)) is None:
            raise
        message, code = described
        raise fail(CloudError(message), code) from None
    except (CommandError, CloudError) as exc:
        raise fail(exc) from None


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the registry up to REVISION (default: the newest)."""
    _migrate(revision, up=True)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; `base` drops every table.")],
) -> None:
    """Migrate the registry down to REVISION."""
    _migrate(revision, up=False)


@db_app.command("current")
def db_current() -> None:
    """Print the registry's revision."""
    from cloud.registry import migrate
    from cloud.registry.db import make_engine

    try:
        engine = make_engine(load_settings().resolved_database_url)
    except CloudError as exc:
        raise fail(exc) from None
    console.print(migrate.current(engine) or "base (empty)")


@apikey_app.command("create")
def apikey_create(
    role: Annotated[Role, typer.Option(help="viewer < operator < admin")],
    name: Annotated[str, typer.Option(help="Whose key this is.")] = "",
) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from cloud.registry import apikeys, audit
    from cloud.registry.db import session_factory, transaction

    with transaction(session_factory(migrated_engine(load_settings()))) as session:
        row, secret = apikeys.create_key(session, role=role, name=name)
        audit.record(session, actor="cli", action="apikey.create", target=row.id, role=role.value)
    err.print(f"created {role.value} key {row.id}; it is shown once, store it now:")
    console.print(secret, soft_wrap=True, highlight=False)


@keys_app.command("export")
def keys_export() -> None:
    """Print the trusted public keys as JSON {key_id: base64 public key}, for provisioning devices."""
    ring = _keyring(load_settings())
    console.print_json(json.dumps({k.key_id: k.public_key for k in ring.public_keys()}))


@keys_app.command("status")
def keys_status() -> None:
    """The trust chain's version, each trusted key (active, staged) and how many devices are behind."""
    from cloud.registry.db import session_factory
    from cloud.registry.devices import behind_on_trust

    settings = load_settings()
    ring = _keyring(settings)
    trust = ring.trust()
    staged = ring.staged()
    with session_factory(migrated_engine(settings))() as session:
        behind = behind_on_trust(session, trust.version)
    console.print(
        f"trust version {trust.version} (threshold {trust.threshold}); {behind} active devices behind it"
    )
    for key in ring.public_keys():
        state = "active" if key.active else "staged" if staged and staged[0] == key.key_id else "trusted"
        console.print(f"  {key.key_id}  {state}")


@keys_app.command("rotate")
def keys_rotate(
    now: Annotated[
        bool, typer.Option("--now", help="Sign with the new key at once, before devices trust it.")
    ] = False,
) -> None:
    """Stage a new signing key: devices learn it from the trust chain, and it signs once every active
    device reports that version (the worker's beat checks), or at `keys activate --force`."""
    ring = _keyring(load_settings())
    try:
        key_id = ring.rotate() if now else ring.stage()
    except CloudError as exc:
        raise fail(exc) from None
    version = ring.trust().version
    if now:
        console.print(f"active signing key: {key_id} (trust version {version})")
    else:
        console.print(
            f"staged signing key {key_id} in trust version {version}: it signs once every active device "
            f"reports that version (`diredi keys status`), or at `diredi keys activate {key_id} --force`"
        )


@keys_app.command("activate")
def keys_activate(
    key_id: str,
    force: Annotated[bool, typer.Option("--force", help="Even if devices do not trust it yet.")] = False,
) -> None:
    """Make a trusted (staged) key the one that signs."""
    from cloud.registry.db import session_factory
    from cloud.registry.devices import behind_on_trust

    settings = load_settings()
    ring = _keyring(settings)
    with session_factory(migrated_engine(settings))() as session:
        behind = behind_on_trust(session, ring.trust().version)
    if behind and not force:
        raise fail(
            CloudError(
                f"{behind} active devices do not report trust version {ring.trust().version} yet and would "
                "refuse what this key signs until they do; --force to activate anyway"
            )
        )
    try:
        ring.activate(key_id)
    except CloudError as exc:
        raise fail(exc) from None
    console.print(f"active signing key: {key_id}")


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Remove a key from the trust chain (a compromised or retired key): devices refuse what it signs
    once the chain reaches them. A revoked active key hands signing to the newest other trusted key."""
    ring = _keyring(load_settings())
    try:
        ring.revoke(key_id)
    except CloudError as exc:
        raise fail(exc) from None
    console.print(f"revoked {key_id}: trust version {ring.trust().version}, active key {ring.active_key_id}")


@keys_app.command("retire")
def keys_retire(key_id: str) -> None:
    """Revoke an old key that no longer signs."""
    ring = _keyring(load_settings())
    try:
        ring.retire(key_id)
    except CloudError as exc:
        raise fail(exc) from None
    console.print(f"retired {key_id}")


def _keyring(settings: Settings) -> KeyRing:
    from cloud.signing import KeyRing

    try:
        return KeyRing.open(settings.resolved_signing_key_dir)
    except CloudError as exc:
        raise fail(exc) from None


@telemetry_app.command("prune")
def telemetry_prune(
    days: Annotated[
        float | None, typer.Option(min=0.0, help="Keep this many days (default: the setting).")
    ] = None,
) -> None:
    """Delete telemetry older than the retention."""
    from cloud.registry import telemetry
    from cloud.registry.db import session_factory

    settings = load_settings()
    retention = timedelta(days=settings.telemetry_retention_days if days is None else days)
    with session_factory(migrated_engine(settings))() as session:
        deleted = telemetry.prune(session, retention=retention)
    console.print(f"deleted {deleted} telemetry rows older than {retention}")


def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
) -> None:
    """Serve the operator REST API (docs at /docs). The registry must be migrated (`diredi db upgrade`)."""
    import uvicorn

    settings = load_settings()
    migrated_engine(settings).dispose()
    from cloud.signing import KeyRing

    KeyRing.open(settings.resolved_signing_key_dir)  # the first key, made once before the workers start
    from broker.exceptions import BrokerURLError
    from cloud.broker_hook import hooks_from_settings

    try:
        hooks_from_settings(settings)  # a bad admin URL stops here, not in every worker
    except BrokerURLError as exc:
        raise fail(exc) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        "cloud.cli.ops:api_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


def api_app() -> FastAPI:
    """The API with the broker's credential hook when DIREDI_MQTT_ADMIN_URL is set (uvicorn's factory,
    called in every worker)."""
    from cloud.api.main import create_app
    from cloud.broker_hook import hooks_from_settings

    settings = Settings()
    return create_app(settings, hooks=hooks_from_settings(settings))


line_app = typer.Typer(help="Model lines (a cohort's cloud and edge models).")


@line_app.command("create")
def line_create(
    cohort: Annotated[str, typer.Option(help="The cohort whose first version this is (created if new).")],
    scenario: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            "--line-file",
            help="A line or scenario JSON: its data, family, seed and presumed split train the line "
            "(a scenario's users keep their private samples out of it).",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="The presumed data: digits, mnist-5k, an .npz (x, y) or an image folder."),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(help="The model family: mlp, conv or package.module:factory (default: by the data)."),
    ] = None,
    image_size: Annotated[
        str | None, typer.Option(help="An image folder's images are resized to HxW, e.g. 28x28.")
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(min=1, max=3, help="An image folder's images become 1 (grey) or 3 (RGB) channels."),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="The seed of the split and the training (with --data).")
    ] = 0,
    max_int8_drop: Annotated[
        float,
        typer.Option(
            min=-1.0,
            max=1.0,
            help="How far int8 validation accuracy may fall below float; the export tries its "
            "fallbacks until one is within it, and gives up otherwise.",
        ),
    ] = 0.010,  # cloud.ml.export.MAX_INT8_DROP, not imported here: it loads torch
) -> None:
    """Train a cohort's first cloud and int8 edge model on presumed data and register them as candidates.

    Name the data and family with flags, or in a line file (a scenario's format; flags override it).
    """
    from cloud.artifacts import LocalArtifactStore
    from cloud.cli.progress import stage_bars
    from cloud.ml.families import resolve_family
    from cloud.ml.scenario import line_scenario
    from cloud.pipeline.lines import bootstrap_line
    from cloud.registry import audit
    from cloud.registry.db import session_factory, transaction
    from cloud.registry.devices import check_cohort_id, create_cohort
    from cloud.registry.models import get_model
    from cloud.registry.tables import Cohort

    logging.getLogger().setLevel(logging.ERROR)  # the converters log chattily
    settings = load_settings()
    try:
        check_cohort_id(cohort)
        spec = line_scenario(
            cohort, scenario, data=data, family=family, image_size=image_size, channels=channels, seed=seed
        )
        if spec.family is not None:  # found before anything is stored; the contract is checked later
            resolve_family(spec.family)
    except CloudError as exc:
        raise fail(exc) from None
    sessions = session_factory(migrated_engine(settings))
    try:
        with transaction(sessions) as session:
            if session.get(Cohort, cohort) is None:
                create_cohort(session, cohort_id=cohort)
                audit.record(session, actor="cli", action="cohort.create", target=cohort)
        with stage_bars(console, label_width=12) as progress:
            cloud_id, edge_id = bootstrap_line(
                sessions,
                LocalArtifactStore(settings.resolved_artifact_dir),
                cohort_id=cohort,
                scenario=spec,
                progress=progress,
                max_int8_drop=max_int8_drop,
            )
        with transaction(sessions) as session:
            audit.record(session, actor="cli", action="line.create", target=edge_id, teacher=cloud_id)
            edge = get_model(session, edge_id)
    except ExportGaveUp as exc:
        raise fail(
            CloudError(f"{exc}; the bootstrap job is recorded as failed, with every attempt")
        ) from None
    except CloudError as exc:
        raise fail(exc) from None
    console.print(
        f"registered {cloud_id} (cloud) and {edge_id} (edge, {edge.size:,} B, "
        f"int8 val acc {edge.metrics['val_int8_acc']:.3f}) as candidates; approve with "
        f"`diredi models approve {edge_id}` (or POST /api/v1/models/{edge_id}/approve with a JSON body, "
        "{} or a reason)"
    )
