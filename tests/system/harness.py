"""What the system tests share: the API served over HTTP from this process (uvicorn on a thread), and
a device daemon configured as provisioning left it (its secret, trusted keys and their trust version)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from broker.client import BrokerTarget
from cloud.children import free_ports
from tests.device.daemons import DaemonProcess, write_config, write_stream
from tests.polling import wait_until

START_S = 30.0


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port, from a thread of this process; yields its URL."""
    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="system-api", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), START_S, "the API did not start")
        assert server.started, "the API stopped while starting"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_S)


def provisioned_daemon(
    directory: Path,
    broker: BrokerTarget,
    provisioning: dict[str, Any],
    *,
    api_url: str,
    stream: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> DaemonProcess:
    """A daemon (not started) for the device of `provisioning`, the API's answer to POST /devices: its
    secret, the trusted keys, their trust version and threshold, as an installer writes them to
    device.toml."""
    directory.mkdir(parents=True)
    inputs, labels = stream
    config = write_config(
        directory,
        broker,
        str(provisioning["device"]["id"]),
        str(provisioning["secret"]),
        write_stream(directory / "stream.npz", inputs, labels),
        trust={str(key["key_id"]): str(key["public_key"]) for key in provisioning["trusted_keys"]},
        trust_version=int(provisioning["trust_version"]),
        trust_threshold=int(provisioning["trust_threshold"]),
        api_url=api_url,
        feedback_every=0,
    )
    return DaemonProcess(config, directory)
