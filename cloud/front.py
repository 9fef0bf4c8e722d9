"""The API's front: render deploy/nginx/nginx.conf for one nginx and check it (docs/api-front.md)."""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shutil
import subprocess  # noqa: S404 (nginx -t, a fixed argument list)
from dataclasses import dataclass, fields
from pathlib import Path

from cloud.exceptions import FrontConfigError
from cloud.filemodes import write_private
from cloud.settings import Settings

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nginx.conf"
CONFIG_NAME = "nginx.conf"
# The API's default body limit (Settings.api_max_body_bytes): the front refuses larger bodies itself.
DEFAULT_MAX_BODY = int(Settings.model_fields["api_max_body_bytes"].default)
# Characters that would end or open an nginx token, a block, a comment or a variable, or a placeholder.
_UNSAFE = re.compile(r"[\s;{}'\"$#@\\]")
# HOST:PORT, an IPv6 host in brackets (its colons would otherwise be ambiguous).
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.*-]+):(?P<port>[0-9]{1,5})$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_EVERY_INTERFACE = {"*", "0.0.0.0", "[::]"}  # noqa: S104 (recognised, to be refused where it cannot be)
_LOOPBACK_HINT = "a loopback address (127.0.0.1, [::1])"
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_LEFT = re.compile(r"@[A-Z_]+@")
_SECRET = re.compile(r"[A-Za-z0-9_-]{32,128}")
_COMPLAINT = re.compile(r"\[(?:emerg|alert|crit)\] (?:\d+#\d+: )?(.*)")


@dataclass(frozen=True)
class FrontLimits:
    """The front's numbers; the defaults are production's (deploy/nginx/nginx.conf says why each).

    Timeouts in whole seconds. `max_body_bytes` should be the API's own limit."""

    header_timeout_s: int = 10
    body_timeout_s: int = 10
    send_timeout_s: int = 30
    keepalive_timeout_s: int = 15
    connections_per_address: int = 32
    requests_per_second: int = 50
    burst: int = 1000
    max_body_bytes: int = DEFAULT_MAX_BODY

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise FrontConfigError(f"{field.name} must be a whole number of at least 1, not {value!r}")


def _address(value: str, what: str, *, loopback: bool = False, wildcard: bool = True) -> str:
    """`value` as an nginx HOST:PORT, refused with a one-line reason."""
    match = _ADDRESS.fullmatch(value)
    if match is None:
        raise FrontConfigError(f"{what} must be HOST:PORT (say 0.0.0.0:8443 or [::1]:8443), not {value!r}")
    host, port = match["host"], int(match["port"])
    if not 1 <= port <= 65535:
        raise FrontConfigError(f"{what}: port {port} is not between 1 and 65535")
    if host in _EVERY_INTERFACE:
        if not wildcard:
            raise FrontConfigError(f"{what} must name one host, not every interface ({value!r})")
        is_loopback = False
    elif _HOSTNAME.fullmatch(host) and not host.replace(".", "").isdigit():
        is_loopback = host == "localhost"
    else:
        try:
            ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
        except ValueError:
            raise FrontConfigError(f"{what}: {host!r} is not an IP address or a host name") from None
        is_loopback = ip.is_loopback
    if loopback and not is_loopback:
        raise FrontConfigError(f"{what} must be {_LOOPBACK_HINT}, not {value!r}")
    return value


def _path(value: Path, what: str, *, must_exist: bool) -> str:
    """`value` made absolute, refused if nginx could not read it as one token (or it is missing)."""
    path = value.expanduser().resolve()
    if _UNSAFE.search(str(path)):
        raise FrontConfigError(f"{what} may not hold spaces, quotes or any of ;{{}}$#@\\: {str(path)!r}")
    if must_exist and not path.is_file():
        raise FrontConfigError(f"{what} {path} is not a file")
    return str(path)


def _account(user: str | None) -> tuple[str, str]:
    """The workers' user and its primary group (default: whoever renders, who can reach the prefix)."""
    if user is None:
        entry = pwd.getpwuid(os.getuid())
    else:
        if not _USER.fullmatch(user):
            raise FrontConfigError(f"user {user!r} is not a valid account name")
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise FrontConfigError(f"user {user!r} does not exist on this host") from None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        raise FrontConfigError(
            f"the primary group ({entry.pw_gid}) of {entry.pw_name!r} has no name"
        ) from None
    for name in (entry.pw_name, group):
        if _UNSAFE.search(name):
            raise FrontConfigError(f"account or group name {name!r} cannot be written in nginx.conf")
    return entry.pw_name, group


def render_config(
    prefix: Path,
    *,
    listen: str,
    upstream: str,
    cert: Path | None,
    key: Path | None,
    user: str | None,
    plain_listen: str | None = None,
    limits: FrontLimits | None = None,
    device_ca: Path | None = None,
    front_secret: str | None = None,
    claim_ca: Path | None = None,
) -> Path:
    """Fill deploy/nginx/nginx.conf in for one front and write it to `<prefix>/nginx.conf`, with the
    directories nginx writes to (`logs/`, `temp/`).

    `listen` serves TLS with `cert` and `key`; without them it serves plain HTTP and must be a loopback
    address. `plain_listen`: a second, plain listener on a loopback address. `upstream`: uvicorn's
    host:port. `user`: whom the workers become when nginx starts as root (default: whoever renders).
    `device_ca` (with `front_secret`, the API's DIREDI_FRONT_SECRET): certificate devices present their
    certificate of that CA, which the front passes on with the secret; with `claim_ca` also the claim
    certificates of device images that enrol (the API lets those reach the enrolment route alone). The
    file holds the secret, so it is written owner-only. Raises FrontConfigError, one line, for a value
    that cannot be used."""
    limits = limits or FrontLimits()
    if (cert is None) != (key is None):
        raise FrontConfigError("give a certificate and its key for TLS, or neither (plain HTTP on loopback)")
    tls = cert is not None and key is not None
    if (device_ca is None) != (front_secret is None):
        raise FrontConfigError("the device CA and the front secret go together (certificate devices)")
    if claim_ca is not None and device_ca is None:
        raise FrontConfigError("the claim CA goes with the device CA (enrolment makes certificate devices)")
    if device_ca is not None and not tls:
        raise FrontConfigError("certificate devices need TLS: give the front's certificate and key")
    if front_secret is not None and not _SECRET.fullmatch(front_secret):
        raise FrontConfigError("the front secret must be 32 to 128 characters of A-Z a-z 0-9 _ -")
    listen = _address(listen, "listen", loopback=not tls)
    if plain_listen is not None:
        plain_listen = _address(plain_listen, "plain listen", loopback=True)
        if plain_listen == listen:
            raise FrontConfigError(f"the plain listener {plain_listen} is the same as the main listener")
    upstream = _address(upstream, "upstream", wildcard=False)
    account, group = _account(user)
    if not TEMPLATE.is_file():
        raise FrontConfigError(f"the template {TEMPLATE} is missing (the front is rendered from a checkout)")
    root = _path(prefix, "prefix", must_exist=False)
    values = {
        "PREFIX": root,
        "USER": account,
        "GROUP": group,
        "LISTEN": listen,
        "LISTEN_TLS": "ssl" if tls else "",
        "TLS": "" if tls else "#",
        "CERT": _path(cert, "certificate", must_exist=True) if cert is not None else "",
        "KEY": _path(key, "key", must_exist=True) if key is not None else "",
        "PLAIN": "" if plain_listen is not None else "#",
        "PLAIN_LISTEN": plain_listen or "",
        "UPSTREAM": upstream,
        "CLIENT_CERT": "" if device_ca is not None else "#",
        "DEVICE_CA": _client_cas(root, device_ca, claim_ca) if device_ca is not None else "",
        "FRONT_SECRET": front_secret or "",
        "HEADER_TIMEOUT": str(limits.header_timeout_s),
        "BODY_TIMEOUT": str(limits.body_timeout_s),
        "SEND_TIMEOUT": str(limits.send_timeout_s),
        "KEEPALIVE_TIMEOUT": str(limits.keepalive_timeout_s),
        "CONNECTIONS_PER_ADDRESS": str(limits.connections_per_address),
        "RATE": str(limits.requests_per_second),
        "BURST": str(limits.burst),
        "MAX_BODY": str(limits.max_body_bytes),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    if left := sorted(set(_LEFT.findall(text))):
        raise FrontConfigError(f"the template has placeholders the renderer does not fill: {', '.join(left)}")
    directory = Path(root)
    # Traversable by the workers' account (temp/ holds the bodies they buffer); nginx makes temp/*.
    for path in (directory, directory / "logs", directory / "temp"):
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    config = directory / CONFIG_NAME
    fresh = config.with_name(f".{CONFIG_NAME}.tmp")  # replaces a config rendered before, atomically
    fresh.unlink(missing_ok=True)
    write_private(fresh, ("\n".join(line.rstrip() for line in text.splitlines()) + "\n").encode())
    fresh.replace(config)
    return config


def _client_cas(root: str, device_ca: Path, claim_ca: Path | None) -> str:
    """The CAs whose client certificates the front verifies: the fleet CA's file, or with claims a
    bundle of both written into the prefix."""
    device = _path(device_ca, "device CA", must_exist=True)
    if claim_ca is None:
        return device
    claim = _path(claim_ca, "claim CA", must_exist=True)
    bundle = Path(root) / "client-cas.pem"
    bundle.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    bundle.write_text(Path(device).read_text() + Path(claim).read_text())
    return str(bundle)


def find_nginx() -> Path | None:
    """The nginx binary (also looked for in /usr/sbin, often not on PATH), or None."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def nginx_command(config: Path, nginx: Path | None = None, *, test: bool = False) -> list[str]:
    """The command that runs nginx on `config` in the foreground (with `test`: that checks it)."""
    binary = str(nginx or find_nginx() or "nginx")
    prefix = f"{config.resolve().parent}/"
    if test:
        return [binary, "-t", "-q", "-p", prefix, "-c", str(config.resolve())]
    return [binary, "-p", prefix, "-c", str(config.resolve()), "-g", "daemon off;"]


def check_config(config: Path, nginx: Path) -> None:
    """Let `nginx -t` read `config` (and the certificate and key); FrontConfigError with its complaint."""
    result = subprocess.run(  # noqa: S603
        nginx_command(config, nginx, test=True), capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        complaint = "; ".join(m[1] for m in _COMPLAINT.finditer(result.stderr))
        raise FrontConfigError(f"nginx -t refused {config}: {complaint or result.stderr.strip()[-500:]}")
