"""`diredi front`: the nginx front of the API (docs/api-front.md)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from cloud.exceptions import FrontConfigError
from cloud.front import FrontLimits, check_config, find_nginx, nginx_command, render_config
from cloud.settings import Settings

console = Console()
err = Console(stderr=True)

front_app = typer.Typer(help="The nginx front of the API: timeouts, limits and TLS before uvicorn.")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(2)


@front_app.command("render")
def render(
    prefix: Annotated[
        Path, typer.Option(help="nginx's directory: the configuration, pid, logs and temporary files.")
    ],
    listen: Annotated[
        str, typer.Option(help="The TLS listener, HOST:PORT; without --cert/--key plain HTTP on loopback.")
    ] = "0.0.0.0:8443",
    upstream: Annotated[str, typer.Option(help="uvicorn (`diredi api`), HOST:PORT.")] = "127.0.0.1:8000",
    cert: Annotated[Path | None, typer.Option(help="The server's certificate chain, PEM.")] = None,
    key: Annotated[Path | None, typer.Option(help="The certificate's private key, PEM.")] = None,
    user: Annotated[
        str | None, typer.Option(help="The workers' account when nginx starts as root (default: yours).")
    ] = None,
    plain_listen: Annotated[
        str | None, typer.Option(help="A second, plain-HTTP listener on loopback (health checks).")
    ] = None,
    device_ca: Annotated[
        Path | None,
        typer.Option(
            help="The fleet CA's certificate: certificate devices download with their certificate. Needs "
            "DIREDI_FRONT_SECRET, the same as the API's.",
        ),
    ] = None,
    claim_ca: Annotated[
        Path | None,
        typer.Option(help="The claim CA's certificate (`diredi claims issue`): device images enrol with it."),
    ] = None,
) -> None:
    """Write PREFIX/nginx.conf (owner-only), check it with `nginx -t` when nginx is installed, and print
    how to run it.

    The body limit is the API's (DIREDI_API_MAX_BODY_BYTES)."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise _fail(f"invalid setting: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    max_body = settings.api_max_body_bytes
    front_secret = None
    if device_ca is not None:
        if settings.front_secret is None:
            raise _fail(
                "--device-ca needs DIREDI_FRONT_SECRET (the API's, which believes what the front verified)"
            )
        front_secret = settings.front_secret.get_secret_value()
    try:
        config = render_config(
            prefix,
            listen=listen,
            upstream=upstream,
            cert=cert,
            key=key,
            user=user,
            plain_listen=plain_listen,
            limits=FrontLimits(max_body_bytes=max_body),
            device_ca=device_ca,
            front_secret=front_secret,
            claim_ca=claim_ca,
        )
        nginx = find_nginx()
        if nginx is not None:
            check_config(config, nginx)
    except FrontConfigError as exc:
        raise _fail(str(exc)) from None
    err.print(f"wrote {escape(str(config))}", highlight=False)
    if nginx is None:
        err.print("nginx is not installed here (scripts/services.sh nginx): the file is not checked")
    else:
        err.print(f"nginx -t: the configuration is valid ({escape(str(nginx))})", highlight=False)
    if user is None and os.geteuid() == 0:
        err.print(
            "[yellow]warning:[/yellow] the workers will run as root: in production pass --user www-data"
        )
    if cert is None:
        err.print("[yellow]note:[/yellow] no --cert/--key: the front serves plain HTTP on loopback only")
    err.print("run it with:")
    console.print(shlex.join(nginx_command(config, nginx)), soft_wrap=True, highlight=False, markup=False)
