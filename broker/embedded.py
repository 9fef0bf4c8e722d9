"""The embedded MQTT 3.1.1 broker (amqtt) of the demo and the unit tests, with mosquitto dynamic
security's credentials, ACLs and control API (`$CONTROL/dynamic-security/v1`, broker/embedded_acl.py).

`EmbeddedBroker` runs on the caller's event loop; `embedded_thread.EmbeddedBrokerThread` runs one on a
loop of its own in a background thread. The state (clients, roles, default access) lives in a JSON file
like the plugin's own, owner-only and replaced atomically on every change.

amqtt 0.12.1 is pinned: `_DynsecBroker` overrides a few of its internal methods where its plugin hooks
come too late or not at all (see docs/embedded-broker.md):
- the password, client id and will topic are checked as soon as CONNECT is read: amqtt asks its auth
  plugins only after it has dropped the old session of that client id or taken over its connection,
  and never checks where a will goes;
- `$CONTROL/dynamic-security/v1` is served (amqtt drops every publish to a `$` topic);
- a PUBLISH to a wildcard topic ends the connection (amqtt stops reading it but leaves it open);
- a client silent for 1.5 keepalives is disconnected, its will sent (amqtt ignores the timeout);
- CONNECT must come within 10 s, and a packet larger than `max_packet_size` ends the connection
  before its body is read (amqtt reads any size).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter  # type: ignore[import-untyped]
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.errors import BrokerError, MQTTError  # type: ignore[import-untyped]
from amqtt.mqtt.connack import ConnackPacket  # type: ignore[import-untyped]
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler  # type: ignore[import-untyped]
from amqtt.session import Session  # type: ignore[import-untyped]

from broker.acl import CONTROL_TOPIC, RESPONSE_TOPIC
from broker.client import BrokerTarget
from broker.dynsec_state import ACCEPTED, NOT_AUTHORIZED, Client
from broker.embedded_acl import DynamicSecurity
from broker.exceptions import EmbeddedBrokerError

log = logging.getLogger(__name__)

# mosquitto.conf's max_packet_size: a 256 KiB knowledge report plus 4 KiB of header and topic.
MAX_PACKET_SIZE = 262_144 + 4_096
CONNECT_TIMEOUT = 10.0  # seconds from TCP accept to CONNECT
_GENERATED_ID = "amqtt/"  # how amqtt names a client that sent an empty client id


# --- amqtt, adapted ---------------------------------------------------------------------------------


class _BoundedReader(ReaderAdapter):  # type: ignore[misc]
    """A client's byte stream that ends at the fixed header of a packet larger than `limit`, so a
    large packet is never read into memory (amqtt then sees the end of the stream and disconnects)."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self._limit = limit
        self._header = bytearray()  # the current packet's fixed header, while it is being read
        self._body_left = 0  # bytes of the current packet's body not read yet
        self._refused = False

    async def read(self, n: int = -1) -> bytes:
        if self._refused:
            return b""
        data = await (self._reader.read(n) if n < 0 else self._reader.readexactly(n))
        if self._body_left > 0:
            self._body_left -= len(data)
            return data
        self._header += data  # amqtt reads a fixed header one byte at a time
        if len(self._header) >= 2 and not self._header[-1] & 0x80:
            length = sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(self._header[1:]))
            self._header.clear()
            self._body_left = length
            if length > self._limit:
                log.warning("closing a connection: a packet of %d bytes is over the limit", length)
                self._refused = True
        elif len(self._header) > 5:  # not MQTT: a remaining length has at most four bytes
            self._refused = True
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class _Handler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's protocol handler, except that a client silent for its keepalive is disconnected."""

    _closing: asyncio.Task[None] | None = None

    def handle_read_timeout(self) -> None:
        self._closing = asyncio.ensure_future(self.handle_connection_closed())


class _DynsecBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with dynamic security's login, ACLs and control topic."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        dynsec: DynamicSecurity,
        save: Callable[[DynamicSecurity], None],
        max_packet_size: int,
    ) -> None:
        super().__init__(config)
        self.dynsec = dynsec
        self._save = save
        self._max_packet_size = max_packet_size
        self._connections: set[asyncio.StreamWriter] = set()

    def bound_port(self) -> int:
        port: int = self._servers["default"].instance.sockets[0].getsockname()[1]
        return port

    def abort(self) -> None:
        """Stop listening and cut every connection at once, sending nothing (a crash, to clients)."""
        for server in self._servers.values():
            server.instance.close()
        for writer in self._connections:
            writer.transport.abort()

    async def kick(self, username: str) -> None:
        """End the live sessions of `username` without their wills, like dynsec's kick."""
        for session, handler in list(self._sessions.values()):
            if session.username == username and session.transitions.is_connected():
                log.info("disconnecting %s (client %s): its credentials changed", username, session.client_id)
                session.will_flag = False
                await handler.handle_connection_closed()

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        self._connections.add(writer)
        try:
            bounded = _BoundedReader(reader, self._max_packet_size)
            await self._client_connected(listener_name, bounded, StreamWriterAdapter(writer))
        finally:
            self._connections.discard(writer)
            writer.close()  # amqtt leaves some refused connections open

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: StreamWriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # amqtt's own, with the login checked before an existing session of the client id is touched.
        try:
            connect = _Handler.init_from_connect(reader, writer, self.plugins_manager)
            handler, session = await asyncio.wait_for(connect, CONNECT_TIMEOUT)
        except (TimeoutError, MQTTError) as exc:
            raise MQTTError(f"no valid CONNECT from {remote_address}:{remote_port}") from exc
        code = await self._login(session)
        if code != ACCEPTED:
            await ConnackPacket.build(0, code).to_stream(writer)
            raise MQTTError(f"refused {session.username!r} as {session.client_id!r} (CONNACK {code})")
        await self._take_over(session.client_id)
        if session.clean_session:
            await self._delete_session(session.client_id)
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive"):
                setattr(existing, name, getattr(session, name))
            existing.username, existing.password = session.username, session.password
            session, session.parent = existing, 1
        else:
            session.parent = 0
        session.keep_alive = math.ceil(session.keep_alive * 1.5)  # MQTT 3.1.2.10: 1.5 keepalives
        return handler, session

    async def _take_over(self, client_id: str) -> None:
        """End the live connection of `client_id`, if any, and wait until it is marked disconnected
        [MQTT-3.1.4-2]. (amqtt leaves it open for a clean session, and otherwise races with its cleanup,
        which can mark the new connection's session disconnected.)"""
        old_session, old_handler = self._sessions.get(client_id, (None, None))
        if old_session is None or not old_session.transitions.is_connected():
            return
        log.info("client %s connected again: closing its previous connection", client_id)
        await old_handler.handle_connection_closed()
        deadline = time.monotonic() + 2.0  # its will is sent first; a dead peer must not hold us long
        while old_session.transitions.is_connected() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def _login(self, session: Session) -> int:
        client_id = session.client_id
        found = self.dynsec.login(
            session.username, None if client_id.startswith(_GENERATED_ID) else client_id
        )
        # The hash runs off the event loop; a control command may change the client meanwhile.
        checked = found.password if isinstance(found, Client) else None
        good = await asyncio.to_thread(self.dynsec.verify_password, found, session.password)
        if isinstance(found, int):
            return found
        if not good or not self.dynsec.still_valid(found, checked):
            return NOT_AUTHORIZED
        if session.will_flag and not self._may_publish_will(session):
            return NOT_AUTHORIZED  # like mosquitto: a will goes where its client may publish, or nowhere
        return ACCEPTED

    def _may_publish_will(self, session: Session) -> bool:
        topic = session.will_topic or ""
        valid = topic and not topic.startswith("$") and "+" not in topic and "#" not in topic
        return bool(valid) and self.dynsec.may_publish(session.username, topic)

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        return True  # every session that gets here was logged in by _initialize_client_session

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if action == Action.PUBLISH:
            return self.dynsec.may_publish(session.username, topic)
        if action == Action.SUBSCRIBE:
            return self.dynsec.may_subscribe(session.username, topic)
        return self.dynsec.may_receive(session.username, topic)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # On every connection amqtt calls this for each filter any client subscribed to, which sent a
        # device the retained messages of others (their presence, their signed desired models).
        if any(holder is session for holder, _ in self._subscriptions.get(subscription[0], ())):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _handle_unsubscription(
        self, session: Session, handler: BrokerProtocolHandler, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        # amqtt has no hook here: a refused unsubscribe is acknowledged and the subscription kept.
        request = unsubscribe_waiter.result()
        request.topics = [t for t in request.topics if self.dynsec.may_unsubscribe(session.username, t)]
        await super()._handle_unsubscription(session, handler, unsubscribe_waiter)

    async def _handle_message_delivery(
        self, session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        if message is not None and (not message.topic or "+" in message.topic or "#" in message.topic):
            log.warning("disconnecting client %s: PUBLISH to an invalid topic", session.client_id)
            await handler.handle_connection_closed()  # the will is sent, as for any protocol error
            return True
        if message is not None and message.topic.startswith("$"):
            if message.topic == CONTROL_TOPIC and self.dynsec.may_publish(session.username, message.topic):
                await self._control(session, handler, bytes(message.data))
            else:
                log.info("dropped a publish of %s to %s", session.client_id, message.topic)
            return True
        result: bool = await super()._handle_message_delivery(session, handler, wait_deliver)
        return result

    async def _control(self, session: Session, handler: BrokerProtocolHandler, payload: bytes) -> None:
        """Run a control message and answer the client that sent it (only it, like mosquitto)."""
        outcome = self.dynsec.execute(payload)
        if outcome.changed:
            try:
                self._save(self.dynsec)
            except OSError:
                log.exception("cannot save the dynamic-security state; the change holds until a restart")
        for username in sorted(outcome.kick):
            await self.kick(username)
        answer = json.dumps(outcome.response).encode()
        await handler.mqtt_publish(RESPONSE_TOPIC, answer, 0, retain=False)


# --- The state file ---------------------------------------------------------------------------------


class StateFile:
    """The dynamic-security state on disk: JSON, owner-only (0600), replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> DynamicSecurity | None:
        """The saved state, or None if there is no file yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EmbeddedBrokerError(f"cannot read {self.path}: {exc.strerror}") from None
        if self.path.stat().st_mode & 0o077:
            log.warning("%s was readable by others: made owner-only", self.path)
            self.path.chmod(0o600)
        try:
            return DynamicSecurity.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddedBrokerError(f"{self.path} is not a dynamic-security state: {exc}") from None

    def save(self, state: DynamicSecurity) -> None:
        """Write `state` to a temporary file beside the old one, then rename it over."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(json.dumps(state.to_json(), indent=1).encode())
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# --- The broker -------------------------------------------------------------------------------------


class EmbeddedBroker:
    """The embedded broker on the running event loop, listening on `host:port` only (port 0: any free
    port, kept for later starts). The state file is created at the first start with one admin client,
    `admin_user` / `admin_password`, like `mosquitto_ctrl dynsec init`; later starts read it."""

    def __init__(
        self,
        state_file: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        admin_user: str = "admin",
        admin_password: str | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
    ) -> None:
        self.host = host
        self.state = StateFile(state_file)
        self._port = port
        self._admin = (admin_user, admin_password)
        self._max_packet_size = max_packet_size
        self._broker: _DynsecBroker | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one chosen, once started with port 0)."""
        return self._port

    @property
    def target(self) -> BrokerTarget:
        """Where it listens, without credentials."""
        return BrokerTarget(self.host, self._port, protocol="3.1.1")

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> None:
        """Read (or create) the state and start listening."""
        if self._broker is not None:
            raise EmbeddedBrokerError("the embedded broker is already running")
        state = self.state.load()
        if state is None:
            user, password = self._admin
            if not password:
                raise EmbeddedBrokerError(f"{self.state.path} does not exist: an admin password creates it")
            state = DynamicSecurity.initial(user, password)
            self.state.save(state)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self._port}"}},
            "plugins": {},
        }
        broker = _DynsecBroker(
            config, dynsec=state, save=self.state.save, max_packet_size=self._max_packet_size
        )
        try:
            await broker.start()
        except BrokerError as exc:
            raise EmbeddedBrokerError(f"cannot listen on {self.host}:{self._port}: {exc.__cause__}") from None
        self._port = broker.bound_port()
        self._broker = broker
        log.info("embedded broker listening on %s:%d, state in %s", self.host, self._port, self.state.path)

    async def stop(self) -> None:
        """Disconnect every client and stop listening (the state is already saved)."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def kill(self) -> None:
        """Stop as a killed process would, to its clients: connections cut, nothing sent."""
        broker, self._broker = self._broker, None
        if broker is not None:
            broker.abort()
            await broker.shutdown()

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM (for a command line)."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await self.start()
        try:
            await stopping.wait()
        finally:
            await self.stop()
