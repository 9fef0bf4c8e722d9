"""mosquitto's production configuration: render it, initialise dynamic security, and bootstrap the
default ACL and the cloud's accounts (docs/broker.md). Tests run the process with
`testsupport.mosquitto.MosquittoProcess`."""

import json
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess  # noqa: S404 (mosquitto and mosquitto_ctrl, fixed argument lists)
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from broker.acl import (
    CLOUD_ROLE,
    Command,
    cloud_account_commands,
    default_access_commands,
    device_pattern_acl,
    service_account_commands,
)
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.dynsec_state import PasswordHash
from broker.exceptions import BrokerAdminError, MosquittoError

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("mosquitto.conf")
CONFIG_NAME = "mosquitto.conf"
DYNSEC_NAME = "dynamic-security.json"
DEVICE_ACL_NAME = "devices.acl"  # certificate mode
LOG_NAME = "mosquitto.log"
PLUGIN_NAME = "mosquitto_dynamic_security.so"
PLUGIN_DIRS = (  # Debian/Ubuntu (multiarch), then source and other distributions' installs
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/usr/lib/arm-linux-gnueabihf"),
    Path("/usr/lib"),
    Path("/usr/local/lib"),
    Path("/usr/lib64"),
)


def find_binary(name: str) -> Path:
    """The path of `mosquitto` or `mosquitto_ctrl` (also looked for in /usr/sbin, often not on PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MosquittoError(f"{name} is not installed (scripts/services.sh mosquitto installs it)")
    return Path(found)


def find_plugin() -> Path:
    """The dynamic-security plugin of the installed mosquitto."""
    for directory in PLUGIN_DIRS:
        if (directory / PLUGIN_NAME).is_file():
            return directory / PLUGIN_NAME
    raise MosquittoError(f"{PLUGIN_NAME} not found in {', '.join(map(str, PLUGIN_DIRS))}")


class ConfigOptions(TypedDict, total=False):
    """What `config_text` and `render_config` take beside the state directory."""

    cert_dir: Path  # required: ca.crt, server.crt, server.key
    port: int  # password mode: the plain loopback listener; certificate mode: the services' TLS listener
    tls_port: int  # the devices' TLS listener
    tls_bind: str | None  # the devices' listener's address (default: every interface)
    plugin: Path | None
    user: str | None
    devices: Literal["password", "certificate"]
    fleet_ca: Path | None  # certificate mode: the fleet CA's certificate (cloud/fleet_ca.py)
    crl_file: Path | None  # certificate mode: its CRL
    service_bind: str  # certificate mode: the services' listener's address (default 127.0.0.1)


def config_text(state_dir: Path, **options: Unpack[ConfigOptions]) -> str:
    """broker/mosquitto.conf filled in for one broker (what `render_config` writes), with devices that
    log in by password (a dynamic-security client each) or by a certificate of the fleet CA (one
    pattern ACL, nothing per device).

    `tls_bind`: the devices' listener's address (default: every interface). `user`: whom mosquitto
    becomes when started as root (default: the user running this, so it can write `state_dir`).
    """
    mode = options.get("devices", "password")
    values = {
        "STATE_DIR": str(state_dir.resolve()),
        "PORT": str(options.get("port", 1883)),
        "TLS_PORT": str(options.get("tls_port", 8883)),
        "TLS_BIND": options.get("tls_bind") or "",
        "CERT_DIR": str(options["cert_dir"].resolve()),
        "PLUGIN": str(options.get("plugin") or find_plugin()),
        "USER": options.get("user") or pwd.getpwuid(os.getuid()).pw_name,
    }
    if mode == "certificate":
        fleet_ca, crl_file = options.get("fleet_ca"), options.get("crl_file")
        if fleet_ca is None or crl_file is None:
            raise MosquittoError("devices by certificate need the fleet CA's certificate and its CRL")
        values |= {
            "FLEET_CA": str(fleet_ca.resolve()),
            "CRL_FILE": str(crl_file.resolve()),
            "SERVICE_BIND": options.get("service_bind", "127.0.0.1"),
        }
    for name, value in values.items():
        if any(c.isspace() for c in value) or "@" in value:
            raise MosquittoError(f"{name} may not hold spaces or '@' in mosquitto.conf: {value!r}")
    security, listeners = _sections(TEMPLATE.with_name(f"mosquitto-{mode}.conf").read_text())
    text = TEMPLATE.read_text().replace("@SECURITY@", security).replace("@LISTENERS@", listeners)
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _sections(fragment: str) -> tuple[str, str]:
    """The SECURITY and LISTENERS sections of a mode's fragment (broker/mosquitto-<mode>.conf)."""
    _, _, rest = fragment.partition("# @@SECURITY\n")
    security, _, listeners = rest.partition("# @@LISTENERS\n")
    return security.strip("\n"), listeners.strip("\n")


def render_config(state_dir: Path, **options: Unpack[ConfigOptions]) -> Path:
    """Fill broker/mosquitto.conf in for one broker (`config_text`) and write it to
    `<state_dir>/mosquitto.conf`, with the devices' ACL file beside it in certificate mode."""
    text = config_text(state_dir, **options)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if options.get("devices") == "certificate":
        (state_dir / DEVICE_ACL_NAME).write_text(device_pattern_acl())
    config = state_dir / CONFIG_NAME
    config.write_text(text)
    return config


def init_dynsec(state_dir: Path, *, admin_user: str, admin_password: str) -> Path:
    """Create the dynamic-security file with its admin account, unless it exists (then it is kept:
    it holds every device's credentials)."""
    path = state_dir / DYNSEC_NAME
    if path.exists():
        return path
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mosquitto_ctrl takes the password as an argument (else it prompts); it is visible to this
    # host's process list for the moment the command runs, never logged here.
    result = subprocess.run(  # noqa: S603
        [str(find_binary("mosquitto_ctrl")), "dynsec", "init", str(path), admin_user, admin_password],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0 or not path.exists():
        detail = (result.stderr or result.stdout).replace(admin_password, "***").strip()
        raise MosquittoError(f"mosquitto_ctrl dynsec init failed: {detail[-500:]}")
    path.chmod(0o600)
    return path


def bootstrap(admin_target: BrokerTarget, *, cloud_user: str, cloud_password: str) -> None:
    """Deny by default and create the cloud's service account. Safe to run again: an existing role or
    account is kept, and the account is given its role and `cloud_password` (a way to rotate it)."""
    with DynsecAdmin(admin_target) as admin:
        admin.execute(default_access_commands())
        for command in cloud_account_commands(cloud_user, cloud_password):
            if _create(admin, command) or command["command"] != "createClient":
                continue
            account = {"username": cloud_user}
            admin.execute([{"command": "setClientPassword", **account, "password": cloud_password}])
            found = admin.execute([{"command": "getClient", **account}])[0]["data"]["client"]
            if CLOUD_ROLE not in {r.get("rolename") for r in found.get("roles", [])}:
                admin.execute(
                    [{"command": "addClientRole", **account, "rolename": CLOUD_ROLE, "priority": 0}]
                )


def ensure_service_account(admin_target: BrokerTarget, name: str, password: str) -> None:
    """Create a service's own account bound to client id `name` (broker.acl.service_account_commands),
    or give an existing one `password` and its role back. Safe to run again."""
    with DynsecAdmin(admin_target) as admin:
        for command in service_account_commands(name, password):
            if _create(admin, command) or command["command"] != "createClient":
                continue
            account = {"username": name}
            admin.execute([{"command": "setClientPassword", **account, "password": password}])
            found = admin.execute([{"command": "getClient", **account}])[0]["data"]["client"]
            if found.get("clientid") != name:
                raise BrokerAdminError(f"{name} exists but is not bound to client id {name}: delete it first")
            if CLOUD_ROLE not in {r.get("rolename") for r in found.get("roles", [])}:
                admin.execute(
                    [{"command": "addClientRole", **account, "rolename": CLOUD_ROLE, "priority": 0}]
                )


def _create(admin: DynsecAdmin, command: Command) -> bool:
    """Run one create command; False if what it creates exists already."""
    try:
        admin.execute([command])
    except BrokerAdminError as exc:
        if exc.failures and all("already exists" in f.error for f in exc.failures):
            return False
        raise
    return True


def _dynsec_document(state_dir: Path) -> dict[str, Any]:
    path = state_dir / DYNSEC_NAME
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MosquittoError(f"{path}: cannot be read as dynamic security's JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MosquittoError(f"{path}: not dynamic security's JSON (no object at the top)")
    return document


def _client(document: dict[str, Any], username: str) -> dict[str, Any] | None:
    for client in document.get("clients") or []:
        if isinstance(client, dict) and client.get("username") == username:
            return client
    return None


def password_matches(state_dir: Path, username: str, password: str) -> bool:
    """Whether `<state_dir>/dynamic-security.json` has the account `username` with `password`, read from
    the file (mosquitto need not run)."""
    client = _client(_dynsec_document(state_dir), username)
    if client is None:
        return False
    try:
        return PasswordHash.from_json(client).verify(password)
    except (KeyError, TypeError, ValueError):
        return False


def bootstrap_missing(state_dir: Path, *, cloud_user: str, cloud_password: str) -> list[str]:
    """What `bootstrap` would still change in `<state_dir>/dynamic-security.json` (read from the file):
    empty once the default access denies and the cloud's account has its role and `cloud_password`."""
    document = _dynsec_document(state_dir)
    missing = []
    wanted = {acl["acltype"]: acl["allow"] for acl in default_access_commands()[0]["acls"]}
    if document.get("defaultACLAccess") != wanted:
        missing.append("the default access (deny)")
    if not any(isinstance(r, dict) and r.get("rolename") == CLOUD_ROLE for r in document.get("roles") or []):
        missing.append(f"the role {CLOUD_ROLE}")
    client = _client(document, cloud_user)
    if client is None:
        missing.append(f"the account {cloud_user}")
    else:
        if CLOUD_ROLE not in {r.get("rolename") for r in client.get("roles") or [] if isinstance(r, dict)}:
            missing.append(f"the role of {cloud_user}")
        if not password_matches(state_dir, cloud_user, cloud_password):
            missing.append(f"the password of {cloud_user}")
    return missing


@contextmanager
def temporary_broker(state_dir: Path, *, port: int, timeout: float = 15.0) -> Iterator[BrokerTarget]:
    """mosquitto on `<state_dir>/dynamic-security.json` alone (one plain listener on 127.0.0.1:`port`,
    no persistence, no TLS) while the block runs: how accounts are made before the broker's own service
    first starts. Nothing else may use that file meanwhile: mosquitto rewrites it whole on each change."""
    state_dir = state_dir.resolve()
    dynsec = state_dir / DYNSEC_NAME
    for value in (str(dynsec), str(find_plugin())):
        if any(c.isspace() for c in value):
            raise MosquittoError(f"a path in mosquitto's configuration may not hold spaces: {value!r}")
    with tempfile.TemporaryDirectory(prefix="diredi-broker-init-") as work:
        config = Path(work) / CONFIG_NAME
        config.write_text(
            "\n".join(
                (
                    "per_listener_settings false",
                    "allow_anonymous false",
                    "allow_zero_length_clientid false",
                    f"plugin {find_plugin()}",
                    f"plugin_opt_config_file {dynsec}",
                    f"user {pwd.getpwuid(os.getuid()).pw_name}",  # stays who runs this: it owns the file
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",  # where "running" is logged
                    f"listener {port} 127.0.0.1",
                    "",
                )
            )
        )
        log_path = Path(work) / LOG_NAME
        with log_path.open("wb") as output:
            process = subprocess.Popen(  # noqa: S603
                [str(find_binary("mosquitto")), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_running(process, port, log_path, timeout)
            yield BrokerTarget(host="127.0.0.1", port=port)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            # mosquitto writes the file anew on every change, with its umask's mode: owner-only again.
            if dynsec.exists():
                dynsec.chmod(0o600)


def _wait_running(process: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float) -> None:
    """Return once mosquitto logged that it runs and its listener accepts; raise if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise MosquittoError(f"mosquitto exited with code {process.returncode}: {' | '.join(tail)}")
        if re.search(rb"mosquitto version \S+ running", log_path.read_bytes()):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                pass
        time.sleep(0.02)
    raise MosquittoError(f"mosquitto did not start on 127.0.0.1:{port} within {timeout:g} s")
