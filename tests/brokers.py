"""Pytest plugin: real brokers for the MQTT tests, each described by a `RunningBroker`.

- `mosquitto` (session): mosquitto 2 with the production configuration of `broker/` (dynamic
  security, deny by default, persistence), started on a free loopback port in a state directory of
  its own. Needs the mosquitto binary (`scripts/services.sh mosquitto`, which `make test` runs).
- `embedded_broker` (in tests/embedded_broker.py): the amqtt broker of `broker/embedded.py`,
  with the same credentials and ACL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from broker.client import BrokerTarget


@dataclass
class RunningBroker:
    """A broker a test can talk to, and (for a real process) kill and start again."""

    kind: str  # "mosquitto" or "embedded"
    target: BrokerTarget  # where it listens, no credentials
    admin: BrokerTarget  # as the dynamic-security admin (creates and deletes device clients)
    cloud: BrokerTarget  # as the cloud's service account (ingest, publisher)
    shared_subscriptions: bool  # MQTT 5 shared subscriptions (mosquitto), or not (amqtt: 3.1.1)
    kill: Callable[[], None] = field(repr=False)  # SIGKILL, no clean shutdown
    start: Callable[[], None] = field(repr=False)  # start again on the same port and state

    def as_device(self, device_id: str, secret: str) -> BrokerTarget:
        """The broker as one device's account."""
        return self.target.with_credentials(device_id, secret)
