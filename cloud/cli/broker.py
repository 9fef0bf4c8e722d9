"""`diredi broker`: the production broker's set-up, its service accounts, and reconciling it."""

from __future__ import annotations

import enum
import ipaddress
import os
import pwd
import re
import secrets
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cloud.cli.common import fail, load_settings, migrated_engine
from cloud.exceptions import CloudError

if TYPE_CHECKING:
    from broker.client import BrokerTarget


class DeviceLogin(enum.StrEnum):
    password = "password"  # noqa: S105 (a mode's name)
    certificate = "certificate"


broker_app = typer.Typer(
    help="The broker: its production set-up, service accounts, and reconciling it with the registry."
)
console = Console()
err = Console(stderr=True)


def _admin_target() -> BrokerTarget:
    from broker.client import BrokerTarget
    from broker.exceptions import BrokerURLError

    settings = load_settings()
    if settings.mqtt_admin_url is None:
        raise fail(CloudError("DIREDI_MQTT_ADMIN_URL is not set: the broker's admin account is needed"))
    try:
        return BrokerTarget.parse(settings.mqtt_admin_url.get_secret_value(), ca_file=settings.mqtt_ca_file)
    except BrokerURLError as exc:
        raise fail(CloudError(f"DIREDI_MQTT_ADMIN_URL: {exc}")) from None


@broker_app.command("account")
def account(
    name: Annotated[str, typer.Argument(help="diredi-<service>-<instance>, e.g. diredi-ingest-a.")],
) -> None:
    """Create (or give a new password to) one service process's own account, bound to the client id
    NAME; print its password once. Run each ingest and worker with it: DIREDI_MQTT_URL as NAME and
    DIREDI_MQTT_CLIENT_ID=NAME."""
    from broker.exceptions import BrokerAdminError
    from broker.mosquitto import ensure_service_account

    target = _admin_target()
    password = secrets.token_hex(32)  # hex: safe in a URL
    try:
        ensure_service_account(target, name, password)
    except (ValueError, BrokerAdminError) as exc:
        raise fail(exc) from None
    err.print(f"account {name}, bound to client id {name}; its password is shown once, store it now:")
    console.print(password, soft_wrap=True, highlight=False)


@broker_app.command("reconcile")
def reconcile(
    sweep: Annotated[
        bool, typer.Option("--sweep", help="Compare the whole broker with the registry.")
    ] = False,
) -> None:
    """Apply to the broker what the registry holds and it does not (revocations made while it was
    down); with --sweep also delete device clients without an active device and repair device roles.
    The worker's beat does this every 15 s (sweeping every 10 minutes)."""
    from broker.dynsec import DynsecAdmin
    from cloud.broker_hook import BrokerCredentialHook, crl_from_settings
    from cloud.broker_hook import reconcile as run
    from cloud.registry.db import session_factory

    target = _admin_target()
    settings = load_settings()
    sessions = session_factory(migrated_engine(settings))
    with DynsecAdmin(target) as admin:
        try:
            hook = BrokerCredentialHook(admin, crl_from_settings(settings, sessions))
            done = run(sessions, hook, sweep=sweep)
        except CloudError as exc:
            raise fail(exc) from None
    console.print(
        f"applied {len(done.applied)}, still pending {len(done.failed)}, removed {len(done.removed)}, "
        f"roles repaired {len(done.repaired)}, missing from the broker {len(done.missing)}"
    )
    for device_id, why in sorted(done.failed.items()):
        err.print(f"  {device_id}: {why}", soft_wrap=True)
    if done.failed:
        raise typer.Exit(1)


ADMIN_USER = "admin"
CLOUD_USER = "diredi-cloud"
CERT_FILES = ("ca.crt", "server.crt", "server.key")
_CREDENTIAL = re.compile(r"^(DIREDI_MQTT_URL|DIREDI_MQTT_ADMIN_URL)=(\S+)$", re.MULTILINE)


@broker_app.command("crl")
def crl() -> None:
    """Re-issue the fleet CA's CRL from the registry's revoked certificate devices and reload the broker
    (DIREDI_BROKER_PID_FILE). The worker's beat does this daily; a CRL past its next update makes the
    broker refuse every certificate device."""
    from cloud.broker_hook import crl_from_settings
    from cloud.registry.db import session_factory

    settings = load_settings()
    publisher = crl_from_settings(settings, session_factory(migrated_engine(settings)))
    try:
        published = publisher.publish()
    except CloudError as exc:
        raise fail(exc) from None
    reloaded = "the broker reloaded it" if settings.broker_pid_file else "reloading it is the deployment's"
    console.print(
        f"wrote {escape(str(published.path))}: {published.revoked} revoked, next update "
        f"{published.next_update:%Y-%m-%d %H:%M} UTC; {reloaded}",
        highlight=False,
        soft_wrap=True,
    )


@broker_app.command("init")
def init(
    state_dir: Annotated[
        Path,
        typer.Option(help="mosquitto's own directory: its configuration, persistence, dynamic security."),
    ],
    cert_dir: Annotated[
        Path, typer.Option(help="ca.crt, server.crt and server.key of the TLS listener (your PKI's).")
    ],
    credentials: Annotated[
        Path,
        typer.Option(help="Where the cloud's and the admin's broker URLs (with passwords) go, owner-only."),
    ],
    port: Annotated[int, typer.Option(help="The plain listener on 127.0.0.1 (the cloud's services).")] = 1883,
    tls_port: Annotated[int, typer.Option(help="The TLS listener (devices).")] = 8883,
    tls_bind: Annotated[
        str | None, typer.Option(help="The TLS listener's IP address (default: every interface).")
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="mosquitto's account when started as root (default: yours).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite a configuration or credentials file that differs.")
    ] = False,
    devices: Annotated[
        DeviceLogin,
        typer.Option(
            help="How devices log in: a password each (a dynamic-security client per device), or a "
            "certificate of the fleet CA (one pattern rule, nothing per device; the services' listener "
            "becomes TLS on --port).",
        ),
    ] = DeviceLogin.password,
    fleet_ca: Annotated[
        Path | None,
        typer.Option(
            help="With --devices certificate: the fleet CA's directory (made if missing; default "
            "DIREDI_FLEET_CA_DIR or <signing key dir>/ca). mosquitto must be able to read it: run it as "
            "the cloud's account (--user), which may then also send it SIGHUP to reload the CRL.",
        ),
    ] = None,
) -> None:
    """Render mosquitto's production configuration into STATE_DIR, initialise dynamic security with
    an admin account, and create the cloud's account (deny by default). Safe to run again: what exists
    is kept, a file that differs is overwritten only with --force, and dynamic-security.json (every
    device's credentials) never is. mosquitto must not be running on STATE_DIR while accounts are made."""
    from broker.acl import device_pattern_acl
    from broker.client import BrokerTarget
    from broker.exceptions import BrokerError
    from broker.mosquitto import (
        CONFIG_NAME,
        DEVICE_ACL_NAME,
        DYNSEC_NAME,
        bootstrap,
        bootstrap_missing,
        config_text,
        find_binary,
        init_dynsec,
        password_matches,
        temporary_broker,
    )
    from cloud.children import free_ports

    _check_init_args(state_dir, cert_dir, credentials, port, tls_port, tls_bind, user)
    if fleet_ca is not None and devices is not DeviceLogin.certificate:
        raise fail(CloudError("--fleet-ca goes with --devices certificate"))
    state_dir, credentials = state_dir.resolve(), credentials.resolve()
    config_path, dynsec = state_dir / CONFIG_NAME, state_dir / DYNSEC_NAME
    try:
        find_binary("mosquitto_ctrl")
        certificates = _fleet_ca_files(fleet_ca) if devices is DeviceLogin.certificate else None
        config = config_text(
            state_dir,
            port=port,
            tls_port=tls_port,
            cert_dir=cert_dir,
            tls_bind=tls_bind,
            user=user,
            devices=devices.value,
            fleet_ca=certificates[0] if certificates else None,
            crl_file=certificates[1] if certificates else None,
        )
        admin_password, cloud_password = _passwords(credentials, dynsec)
        # Certificate mode: the services' listener is TLS too (the lab or your PKI's server certificate).
        tls = devices is DeviceLogin.certificate
        local = BrokerTarget(host="127.0.0.1", port=port, tls=tls, ca_file=cert_dir.resolve() / "ca.crt")
        admin = local.with_credentials(ADMIN_USER, admin_password)
        cloud = local.with_credentials(CLOUD_USER, cloud_password)
        group = _ingest_group(credentials) if tls else None
        wanted = _credentials_text(cloud, admin, local.ca_file if tls else None, group)
        if dynsec.exists() and not password_matches(state_dir, ADMIN_USER, admin_password):
            raise fail(CloudError(f"{credentials}: its admin password does not open {dynsec}"))
        missing = (
            bootstrap_missing(state_dir, cloud_user=CLOUD_USER, cloud_password=cloud_password)
            if dynsec.exists()
            else ["the admin, the default access and the cloud's account"]
        )
    except BrokerError as exc:
        raise fail(exc) from None
    files = [(config_path, config), (credentials, wanted)]
    if certificates:
        files.append((state_dir / DEVICE_ACL_NAME, device_pattern_acl()))
    plan = {path: _plan(path, text, force) for path, text in files}
    if missing and _listening(port):
        raise fail(
            CloudError(
                f"something listens on 127.0.0.1:{port}: stop the broker on {state_dir} first (it would "
                f"overwrite the accounts made now), or add service accounts with `diredi broker account`"
            )
        )
    created = not dynsec.exists()
    # The credentials first: once dynamic security exists, its admin password is known nowhere else.
    for path, text in sorted(files, key=lambda file: file[0] != credentials):
        if plan[path] != "unchanged":
            _write_private(path, text)
    try:
        if created:
            init_dynsec(state_dir, admin_user=ADMIN_USER, admin_password=admin_password)
        if missing:
            with temporary_broker(state_dir, port=free_ports(1)[0]) as temporary:
                bootstrap(
                    temporary.with_credentials(ADMIN_USER, admin_password),
                    cloud_user=CLOUD_USER,
                    cloud_password=cloud_password,
                )
        if user is not None and os.geteuid() == 0:
            _give(state_dir, user)  # mosquitto reads the plugin's file after it became `user`
    except (BrokerError, OSError) as exc:
        raise fail(exc) from None
    _report(plan, dynsec, created=created, missing=missing, port=port, tls_port=tls_port)
    if certificates:
        console.print(
            f"devices log in with certificates of the fleet CA in {escape(str(certificates[0].parent))}: "
            "set DIREDI_FLEET_CA_DIR to it, and DIREDI_BROKER_PID_FILE to mosquitto's pid file so that a "
            "revocation reloads its CRL at once (docs/certificate-identity.md)",
            highlight=False,
            soft_wrap=True,
        )


def _fleet_ca_files(directory: Path | None) -> tuple[Path, Path]:
    """The fleet CA's certificate and CRL for mosquitto, the CA made and a first (empty) CRL written if
    there is none yet: the beat re-issues it from the registry."""
    from cloud.exceptions import SigningError
    from cloud.fleet_ca import FleetCA

    try:
        ca = FleetCA.open(directory or load_settings().resolved_fleet_ca_dir)
        crl = ca.directory / "crl.pem"
        if not crl.exists():
            ca.write_crl([])
    except (SigningError, OSError) as exc:
        raise fail(CloudError(f"the fleet CA: {exc}")) from None
    return ca.directory / "ca.pem", crl


def _check_init_args(
    state_dir: Path,
    cert_dir: Path,
    credentials: Path,
    port: int,
    tls_port: int,
    tls_bind: str | None,
    user: str | None,
) -> None:
    """Refuse, in one line, what `init` cannot use, before anything is written."""
    for option, number in (("--port", port), ("--tls-port", tls_port)):
        if not 1 <= number <= 65535:
            raise fail(CloudError(f"{option} must be between 1 and 65535, not {number}"))
    if port == tls_port:
        raise fail(CloudError(f"--port and --tls-port must differ (both {port})"))
    if tls_bind is not None:
        try:
            ipaddress.ip_address(tls_bind)
        except ValueError:
            raise fail(CloudError(f"--tls-bind must be an IP address, not {tls_bind!r}")) from None
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise fail(CloudError(f"--user {user}: no such account on this host")) from None
    for option, path in (
        ("--state-dir", state_dir),
        ("--cert-dir", cert_dir),
        ("--credentials", credentials),
    ):
        if any(c.isspace() for c in str(path.resolve())) or "@" in str(path):
            raise fail(CloudError(f"{option} {path}: mosquitto's configuration cannot hold spaces or '@'"))
    if state_dir.exists() and not state_dir.is_dir():
        raise fail(CloudError(f"--state-dir {state_dir}: exists and is not a directory"))
    _check_writable("--state-dir", state_dir)
    for name in CERT_FILES:
        if not (cert_dir / name).is_file():
            raise fail(
                CloudError(
                    f"--cert-dir {cert_dir}: no {name} (your PKI's certificate and key; broker/certs.sh "
                    "makes lab ones, never for production)"
                )
            )
    if credentials.is_dir():
        raise fail(CloudError(f"--credentials {credentials}: is a directory, give a file name"))
    if not credentials.parent.is_dir():
        raise fail(CloudError(f"--credentials {credentials}: directory {credentials.parent} does not exist"))
    _check_writable("--credentials", credentials.parent)


def _check_writable(option: str, path: Path) -> None:
    """`path`, or the nearest of its parents that exists, must be a directory this user can write in
    (tried, not judged from its mode: root may not write on a read-only file system either)."""
    existing = path.resolve()
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise fail(CloudError(f"{option} {path}: {existing} is not a directory you may write in")) from None


def _passwords(credentials: Path, dynsec: Path) -> tuple[str, str]:
    """The admin's and the cloud's passwords: from the credentials file of an earlier run, or new."""
    from broker.client import BrokerTarget
    from broker.exceptions import BrokerURLError

    if not credentials.exists():
        if dynsec.exists():
            raise fail(
                CloudError(
                    f"{dynsec} exists but {credentials} does not: the admin's password is unknown; give "
                    "the --credentials file its first run wrote"
                )
            )
        return secrets.token_hex(32), secrets.token_hex(32)  # hex: safe in a URL
    try:
        found = dict(_CREDENTIAL.findall(credentials.read_text()))
        admin = BrokerTarget.parse(found["DIREDI_MQTT_ADMIN_URL"])
        cloud = BrokerTarget.parse(found["DIREDI_MQTT_URL"])
    except (OSError, UnicodeDecodeError, KeyError, BrokerURLError):
        raise fail(
            CloudError(f"--credentials {credentials}: exists, and is not a file `diredi broker init` wrote")
        ) from None
    if (
        admin.username != ADMIN_USER
        or cloud.username != CLOUD_USER
        or not admin.password
        or not cloud.password
    ):
        raise fail(
            CloudError(f"--credentials {credentials}: names other accounts than {ADMIN_USER}, {CLOUD_USER}")
        )
    return admin.password, cloud.password


def _credentials_text(
    cloud: BrokerTarget, admin: BrokerTarget, ca_file: Path | None, group: str | None
) -> str:
    return (
        "# The broker's accounts for the cloud, written by `diredi broker init`; keep it owner-only.\n"
        f"# Copy {'these' if ca_file else 'both'} lines into /etc/diredi/diredi.env. The admin's password is "
        "kept nowhere else.\n"
        f"DIREDI_MQTT_URL={cloud.url()}\n"
        f"DIREDI_MQTT_ADMIN_URL={admin.url()}\n"
        + (f"DIREDI_MQTT_CA_FILE={ca_file}\n" if ca_file is not None else "")
        # mosquitto's acl_file does not check SUBSCRIBE: a device that named the ingests' shared group
        # would be handed a share of the fleet's messages (and be denied them): a name it cannot guess.
        + (f"DIREDI_INGEST_GROUP={group}\n" if group is not None else "")
    )


_GROUP = re.compile(r"^DIREDI_INGEST_GROUP=(diredi-ingest-[0-9a-f]{32})$", re.MULTILINE)


def _ingest_group(credentials: Path) -> str:
    """The ingests' shared-subscription group: an earlier run's, or a new name no device can guess."""
    try:
        found = _GROUP.search(credentials.read_text())
    except (OSError, UnicodeDecodeError):
        found = None
    return found[1] if found else f"diredi-ingest-{secrets.token_hex(16)}"


def _plan(path: Path, text: str, force: bool) -> str:
    """What becomes of one file: written, unchanged, or overwritten (--force); refuse otherwise."""
    if not path.exists():
        return "written"
    try:
        if path.read_text() == text:
            return "unchanged"
    except (OSError, UnicodeDecodeError):
        pass
    if not force:
        raise fail(CloudError(f"{path} exists and differs from what this run makes: --force to overwrite it"))
    return "overwritten"


def _write_private(path: Path, text: str) -> None:
    """Write `path` owner-only, whole or not at all."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as output:
            output.write(text)
        temporary.replace(path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise fail(CloudError(f"{path}: cannot write: {exc.strerror}")) from None


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _give(state_dir: Path, user: str) -> None:
    """Hand the state directory and its files to mosquitto's account."""
    account = pwd.getpwnam(user)
    for path in (state_dir, *state_dir.iterdir()):
        os.chown(path, account.pw_uid, account.pw_gid)


def _report(
    plan: dict[Path, str], dynsec: Path, *, created: bool, missing: list[str], port: int, tls_port: int
) -> None:
    """What each file became, what was created in the broker, and what the operator does next."""
    for path, done in plan.items():
        console.print(f"{done:11} {escape(str(path))}", highlight=False)
    console.print(f"{'written' if created else 'kept':11} {escape(str(dynsec))}", highlight=False)
    if missing:
        console.print(f"{'applied':11} {', '.join(missing)}", highlight=False, soft_wrap=True)
    if not missing and all(done == "unchanged" for done in plan.values()):
        console.print("nothing changed: the broker was initialised already")
    config, credentials = list(plan)[:2]
    console.print(
        f"next: run mosquitto with `mosquitto -c {escape(str(config))}` (plain 127.0.0.1:{port} for the "
        f"cloud, TLS port {tls_port} for devices); copy DIREDI_MQTT_URL and DIREDI_MQTT_ADMIN_URL from "
        f"{escape(str(credentials))} (owner-only) into /etc/diredi/diredi.env",
        highlight=False,
        soft_wrap=True,
    )
