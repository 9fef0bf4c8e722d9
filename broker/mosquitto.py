"""mosquitto's production configuration: render it, initialise dynamic security, and bootstrap the
default ACL and the cloud's accounts (docs/broker.md). Tests run the process with
`testsupport.mosquitto.MosquittoProcess`."""

import logging
import os
import pwd
import shutil
import subprocess  # noqa: S404 (mosquitto and mosquitto_ctrl, fixed argument lists)
from pathlib import Path

from broker.acl import (
    CLOUD_ROLE,
    Command,
    cloud_account_commands,
    default_access_commands,
    service_account_commands,
)
from broker.client import BrokerTarget
from broker.dynsec import DynsecAdmin
from broker.exceptions import BrokerAdminError, MosquittoError

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("mosquitto.conf")
CONFIG_NAME = "mosquitto.conf"
DYNSEC_NAME = "dynamic-security.json"
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


def render_config(
    state_dir: Path,
    *,
    port: int = 1883,
    tls_port: int = 8883,
    cert_dir: Path,
    tls_bind: str | None = None,
    plugin: Path | None = None,
    user: str | None = None,
) -> Path:
    """Fill broker/mosquitto.conf in for one broker and write it to `<state_dir>/mosquitto.conf`.

    `tls_bind`: the TLS listener's address (default: every interface). `user`: whom mosquitto
    becomes when started as root (default: the user running this, so it can write `state_dir`).
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    values = {
        "STATE_DIR": str(state_dir),
        "PORT": str(port),
        "TLS_PORT": str(tls_port),
        "TLS_BIND": tls_bind or "",
        "CERT_DIR": str(cert_dir.resolve()),
        "PLUGIN": str(plugin or find_plugin()),
        "USER": user or pwd.getpwuid(os.getuid()).pw_name,
    }
    for name, value in values.items():
        if any(c.isspace() for c in value) or "@" in value:
            raise MosquittoError(f"{name} may not hold spaces or '@' in mosquitto.conf: {value!r}")
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    config = state_dir / CONFIG_NAME
    config.write_text("\n".join(line.rstrip() for line in text.splitlines()) + "\n")
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
