"""Rendering the front's nginx.conf (cloud/front.py) and `diredi front render`: production's numbers, TLS or
plain loopback, values that cannot be written refused in one line, and nginx's own check."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.cli.main import app
from cloud.exceptions import FrontConfigError
from cloud.front import TEMPLATE, FrontLimits, check_config, find_nginx, render_config
from tests.front.nginx import needs_nginx


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """A certificate and key file pair (contents do not matter until nginx reads them)."""
    directory = tmp_path / "certs"
    directory.mkdir()
    for name in ("server.crt", "server.key"):
        (directory / name).write_text("PEM\n")
    return directory


def directives(config: Path) -> dict[str, str]:
    """`name value` of every active (not commented) directive line, the last one of each name."""
    found = {}
    for line in config.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line.endswith(";"):
            name, _, value = line[:-1].partition(" ")
            found[name] = value.strip()
    return found


def test_the_production_configuration_states_the_numbers_and_a_tls_listener(
    tmp_path: Path, certs: Path
) -> None:
    # Execute
    config = render_config(
        tmp_path / "front",
        listen="0.0.0.0:8443",
        upstream="127.0.0.1:8000",
        cert=certs / "server.crt",
        key=certs / "server.key",
        user=None,
    )

    # Assert
    seen = directives(config)
    prefix = str((tmp_path / "front").resolve())
    assert config == tmp_path.resolve() / "front" / "nginx.conf"
    assert (Path(prefix) / "logs").is_dir() and (Path(prefix) / "temp").is_dir()
    assert seen["listen"] == "0.0.0.0:8443 ssl"
    assert seen["ssl_certificate"] == str(certs / "server.crt")
    assert seen["ssl_protocols"] == "TLSv1.2 TLSv1.3"
    assert seen["client_max_body_size"] == str(1 << 20)
    assert (seen["client_header_timeout"], seen["client_body_timeout"]) == ("10s", "10s")
    assert (seen["send_timeout"], seen["keepalive_timeout"]) == ("30s", "4s")  # the last: the upstream's
    assert seen["limit_conn"] == "per_address 32"
    assert seen["limit_req"] == "zone=per_address_rate burst=1000 nodelay"
    assert "rate=50r/s" in seen["limit_req_zone"]
    assert (seen["limit_conn_status"], seen["limit_req_status"]) == ("429", "429")
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in config.read_text()
    assert seen["pid"] == f"{prefix}/nginx.pid"
    assert seen["user"].split()[0] == pwd.getpwuid(os.getuid()).pw_name
    assert "@" not in re.sub(r"#.*", "", config.read_text())  # every placeholder filled


def test_without_a_certificate_the_front_is_plain_http_on_loopback(tmp_path: Path) -> None:
    # Execute
    config = render_config(
        tmp_path / "front",
        listen="127.0.0.1:8080",
        upstream="127.0.0.1:8000",
        cert=None,
        key=None,
        user=None,
        plain_listen="[::1]:8081",
        limits=FrontLimits(header_timeout_s=3, max_body_bytes=4096),
    )

    # Assert
    text = config.read_text()
    assert "listen 127.0.0.1:8080 ;" in text and "listen [::1]:8081;" in text
    assert "\n        #ssl_certificate ;" in text and "ssl_certificate " not in directives(config)
    assert directives(config)["client_header_timeout"] == "3s"
    assert directives(config)["client_max_body_size"] == "4096"
    assert '"detail": "the request body is larger than 4096 bytes"' in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listen": "0.0.0.0:8443", "cert": None, "key": None}, "listen must be a loopback address"),
        ({"listen": "127.0.0.1:8443; include /etc/passwd"}, "listen must be HOST:PORT"),
        ({"listen": "127.0.0.1:0"}, "port 0 is not between 1 and 65535"),
        ({"listen": "127.0.0.1:70000"}, "port 70000"),
        ({"listen": "8443"}, "listen must be HOST:PORT"),
        ({"listen": "bad..host:8443"}, "is not an IP address or a host name"),
        ({"upstream": "0.0.0.0:8000"}, "upstream must name one host"),
        ({"upstream": "127.0.0.1:8000 backup"}, "upstream must be HOST:PORT"),
        ({"plain_listen": "10.0.0.1:8080"}, "plain listen must be a loopback address"),
        ({"plain_listen": "127.0.0.1:8443", "listen": "127.0.0.1:8443"}, "the same as the main listener"),
        ({"key": None}, "give a certificate and its key for TLS, or neither"),
        ({"cert": Path("/nonexistent/server.crt")}, "is not a file"),
        ({"user": "no-such-account-here"}, "does not exist"),
        ({"user": "root;"}, "is not a valid account name"),
        ({"prefix": "with space"}, "prefix may not hold spaces"),
        ({"prefix": "a;b"}, "prefix may not hold spaces"),
        ({"prefix": "a{b}"}, "prefix may not hold spaces"),
        ({"device_ca": Path("/nonexistent/ca.pem")}, "the device CA and the front secret go together"),
        ({"front_secret": "s" * 32}, "the device CA and the front secret go together"),
        ({"claim_ca": Path("/x")}, "the claim CA goes with the device CA"),
        (
            {"device_ca": Path("/nonexistent/ca.pem"), "front_secret": "s" * 32},
            "device CA /nonexistent/ca.pem is not a file",
        ),
        ({"device_ca": Path("/x"), "front_secret": "short"}, "the front secret must be 32 to 128"),
        ({"device_ca": Path("/x"), "front_secret": "s" * 31 + '"'}, "the front secret must be 32 to 128"),
        (
            {"device_ca": Path("/x"), "front_secret": "s" * 32, "cert": None, "key": None},
            "certificate devices need TLS",
        ),
    ],
)
def test_a_value_that_cannot_be_written_is_refused_in_one_line(
    tmp_path: Path, certs: Path, change: dict[str, object], message: str
) -> None:
    # Prepare
    arguments: dict[str, object] = {
        "listen": "127.0.0.1:8443",
        "upstream": "127.0.0.1:8000",
        "cert": certs / "server.crt",
        "key": certs / "server.key",
        "user": None,
    } | change
    prefix = tmp_path / str(arguments.pop("prefix", "front"))

    # Execute
    with pytest.raises(FrontConfigError) as refused:
        render_config(prefix, **arguments)  # type: ignore[arg-type]

    # Assert
    assert message in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (prefix / "nginx.conf").exists()


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_a_limit_must_be_a_whole_number_of_at_least_one(value: object) -> None:
    with pytest.raises(FrontConfigError, match="header_timeout_s must be a whole number of at least 1"):
        FrontLimits(header_timeout_s=value)  # type: ignore[arg-type]


def test_the_template_holds_no_placeholder_the_renderer_does_not_know() -> None:
    known = {
        "PREFIX", "USER", "GROUP", "LISTEN", "LISTEN_TLS", "TLS", "CERT", "KEY", "PLAIN", "PLAIN_LISTEN",
        "UPSTREAM", "HEADER_TIMEOUT", "BODY_TIMEOUT", "SEND_TIMEOUT", "KEEPALIVE_TIMEOUT",
        "CONNECTIONS_PER_ADDRESS", "RATE", "BURST", "MAX_BODY", "CLIENT_CERT", "DEVICE_CA", "FRONT_SECRET",
    }  # fmt: skip

    assert set(re.findall(r"@([A-Z_]+)@", TEMPLATE.read_text())) == known


@needs_nginx
def test_nginx_accepts_the_rendered_configuration_and_refuses_a_mismatched_key(
    tmp_path: Path, lab_certs: Path
) -> None:
    # Prepare
    nginx = find_nginx()
    assert nginx is not None
    good = render_config(
        tmp_path / "good",
        listen="127.0.0.1:8443",
        upstream="127.0.0.1:8000",
        cert=lab_certs / "server.crt",
        key=lab_certs / "server.key",
        user=None,
        plain_listen="127.0.0.1:8080",
    )
    mismatched = render_config(
        tmp_path / "bad",
        listen="127.0.0.1:8443",
        upstream="127.0.0.1:8000",
        cert=lab_certs / "ca.crt",  # not the key's certificate
        key=lab_certs / "server.key",
        user=None,
    )

    # Execute
    check_config(good, nginx)
    with pytest.raises(FrontConfigError) as refused:
        check_config(mismatched, nginx)

    # Assert
    assert "key values mismatch" in str(refused.value) and "\n" not in str(refused.value)


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300", "NO_COLOR": "1", **(env or {})})
    return result.exit_code, result.stdout, result.stderr


@needs_nginx
def test_the_cli_renders_checks_and_prints_the_command_line(
    tmp_path: Path, lab_certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the API's body limit set for this deployment
    monkeypatch.setenv("DIREDI_API_MAX_BODY_BYTES", "2097152")
    prefix = tmp_path / "front"

    # Execute
    code, out, err = invoke(
        "front", "render", "--prefix", str(prefix), "--listen", "0.0.0.0:8443",
        "--upstream", "127.0.0.1:8000", "--cert", str(lab_certs / "server.crt"),
        "--key", str(lab_certs / "server.key"), "--plain-listen", "127.0.0.1:8080",
    )  # fmt: skip

    # Assert
    config = prefix.resolve() / "nginx.conf"
    assert code == 0, err
    assert out.strip() == f"{find_nginx()} -p {config.parent}/ -c {config} -g 'daemon off;'"
    assert "the configuration is valid" in err
    assert directives(config)["client_max_body_size"] == "2097152"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "0.0.0.0:8443"], "listen must be a loopback address"),
        (["--listen", "127.0.0.1:8443", "--upstream", "api:8000;"], "upstream must be HOST:PORT"),
    ],
)
def test_the_cli_refuses_bad_values_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    code, out, err = invoke("front", "render", "--prefix", str(tmp_path / "front"), *args)

    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "front" / "nginx.conf").exists()
