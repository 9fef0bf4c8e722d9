"""The embedded MQTT 3.1.1 broker (amqtt) of the demo and the unit tests, with mosquitto dynamic
security's credentials, ACLs and control API (`$CONTROL/dynamic-security/v1`, broker/embedded_acl.py).

`EmbeddedBroker` runs on the caller's event loop; `embedded_thread.EmbeddedBrokerThread` runs one on a
loop of its own in a background thread. The state (clients, roles, default access) lives in a JSON file
like the plugin's own, owner-only and replaced atomically on every change.

It accepts each connection itself and reads CONNECT first: the login is checked before amqtt touches
any session, a packet over `max_packet_size` or a client silent for 1.5 keepalives ends the stream
amqtt reads. amqtt's plugin hooks decide publish, subscribe and receive; three private methods of the
pinned amqtt are overridden where it has no hook (docs/embedded-broker.md, "Its dependency on amqtt";
tests/broker/test_embedded_amqtt_contract.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter  # type: ignore[import-untyped]
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler  # type: ignore[import-untyped]
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]
from amqtt.session import Session  # type: ignore[import-untyped]

from broker.acl import CONTROL_TOPIC, RESPONSE_TOPIC
from broker.client import BrokerTarget
from broker.dynsec_state import ACCEPTED, NOT_AUTHORIZED, UNACCEPTABLE_PROTOCOL, Client, Hello
from broker.embedded_acl import DynamicSecurity
from broker.exceptions import EmbeddedBrokerError

log = logging.getLogger(__name__)

# mosquitto.conf's max_packet_size: a 256 KiB knowledge report plus 4 KiB of header and topic.
MAX_PACKET_SIZE = 262_144 + 4_096
CONNECT_TIMEOUT = 10.0  # seconds from TCP accept to CONNECT
LISTENER = "default"  # amqtt's name of the listener whose connections EmbeddedBroker accepts


# --- The connection, before and under amqtt ---------------------------------------------------------


class _Gate(ReaderAdapter):  # type: ignore[misc]
    """A client's byte stream as amqtt reads it, passed on one whole packet at a time. It ends (amqtt
    then closes the connection and sends the will) at a packet over `limit` bytes, before its body is
    read, and after `silence` seconds without a byte (None: no limit)."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader = reader
        self._limit = limit
        self.silence: float | None = None
        self._buffer = bytearray()  # read from the client, not yet by amqtt
        self._next: asyncio.Future[bytes] | None = None  # the packet being read
        self._ended = False
        self._first = True

    async def packet(self) -> bytes:
        """The next whole packet, fixed header included; b"" once the stream has ended."""
        if self._ended:
            return b""
        if self._next is None:
            self._next = asyncio.ensure_future(self._read_packet())
        # Shielded: amqtt's own keepalive timer cancels its read, which must not lose half a packet.
        packet = await asyncio.shield(self._next)
        self._next = None
        self._ended = not packet
        return packet

    def unread(self, packet: bytes) -> None:
        """Hand `packet` to amqtt before the rest of the stream."""
        self._buffer[:0] = packet

    async def read(self, n: int = -1) -> bytes:
        while len(self._buffer) < (n if n >= 0 else 1) and (packet := await self.packet()):
            self._buffer += packet
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def feed_eof(self) -> None:
        self._ended = True

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()

    async def _read_packet(self) -> bytes:
        try:
            header = bytearray(await self._exactly(1))
            if self._first and header[0] != 0x10:
                raise ValueError("the first packet is not a CONNECT")
            self._first = False
            for _ in range(4):
                header += await self._exactly(1)
                if not header[-1] & 0x80:
                    break
            else:
                raise ValueError("not MQTT: a remaining length has at most four bytes")
            length = sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(header[1:]))
            if length > self._limit:
                raise ValueError(f"a packet of {length} bytes is over the limit")
            body = bytearray()
            while len(body) < length:
                chunk = await asyncio.wait_for(self._reader.read(length - len(body)), self.silence)
                if not chunk:
                    return b""
                body += chunk
            topic = body[2 : 2 + int.from_bytes(body[:2], "big")]
            if header[0] >> 4 == 3 and (not topic or b"+" in topic or b"#" in topic):
                # amqtt would stop reading this PUBLISH at its topic, and take its payload for a packet
                raise ValueError("a PUBLISH to an empty or wildcard topic")
            return bytes(header + body)
        except TimeoutError:
            log.info("closing a connection silent for %s s", self.silence)
        except ValueError as exc:
            log.warning("closing a connection: %s", exc)
        except (EOFError, OSError):
            pass  # the client closed it
        return b""

    async def _exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self._reader.readexactly(n), self.silence)


# --- amqtt's broker, with dynamic security ----------------------------------------------------------


class DynsecPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """Dynamic security's ACLs as amqtt's topic plugin: publish, subscribe, receive. As its auth plugin
    it accepts every session: amqtt asks only after it has dropped or taken over the client id's old
    session, so the login was checked before, as CONNECT was read (`_DynsecBroker.admit`)."""

    @dataclass
    class Config:
        dynsec: DynamicSecurity

    async def authenticate(self, *, session: Session) -> bool:
        return True

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        dynsec: DynamicSecurity = self.config.dynsec
        username = session.username if session is not None else None
        if topic is None:
            return False
        if action == Action.PUBLISH:
            return dynsec.may_publish(username, topic)
        if action == Action.SUBSCRIBE:
            return dynsec.may_subscribe(username, topic)
        return action == Action.RECEIVE and dynsec.may_receive(username, topic)


class _DynsecBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with dynamic security's login and control topic. Connections come from
    `EmbeddedBroker` through the public `external_connected`, once `admit` accepted their CONNECT."""

    def __init__(self, dynsec: DynamicSecurity, save_state: Callable[[DynamicSecurity], None]) -> None:
        plugins = {f"{__name__}.DynsecPlugin": {"dynsec": dynsec}}
        super().__init__({"listeners": {LISTENER: {"type": "external"}}, "plugins": plugins})
        self.dynsec = dynsec
        self.save_state = save_state

    async def admit(self, hello: Hello) -> int:
        """The CONNACK code for `hello`, decided before any session of its client id is touched. Once
        accepted, the client id's live connection is ended ([MQTT-3.1.4-2])."""
        if hello.level != 4:
            return UNACCEPTABLE_PROTOCOL
        found = self.dynsec.login(hello.username, hello.client_id)
        # The hash runs off the event loop; a control command may change the client meanwhile.
        checked = found.password if isinstance(found, Client) else None
        good = await asyncio.to_thread(self.dynsec.verify_password, found, hello.password)
        if isinstance(found, int):
            return found
        if not good or not self.dynsec.still_valid(found, checked):
            return NOT_AUTHORIZED
        if hello.will_topic is not None and not self.may_send_will(hello.username, hello.will_topic):
            return NOT_AUTHORIZED  # like mosquitto: a will goes where its client may publish, or nowhere
        await self.take_over(hello)
        return ACCEPTED

    def may_send_will(self, username: str | None, topic: str) -> bool:
        valid = topic and not topic.startswith("$") and "+" not in topic and "#" not in topic
        return bool(valid) and self.dynsec.may_publish(username, topic)

    async def take_over(self, hello: Hello) -> None:
        """End the live connection of the client id, if any, and wait until it is marked disconnected.
        (amqtt leaves it open for a clean session, and otherwise races with its cleanup, which can mark
        the new connection's session disconnected.)"""
        session, handler = self.sessions.get(hello.client_id, (None, None))
        if session is None:
            return
        if session.transitions.is_connected():
            log.info("client %s connected again: closing its previous connection", hello.client_id)
            await handler.handle_connection_closed()
            deadline = time.monotonic() + 2.0  # its will is sent first; a dead peer must not hold us long
            while session.transitions.is_connected() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if not hello.clean_session:  # amqtt copies the new CONNECT's will to a kept session, but this flag
            session.will_retain = hello.will_retain

    async def kick(self, username: str) -> None:
        """End the live sessions of `username` without their wills, like dynsec's kick."""
        for session, handler in list(self.sessions.values()):
            if session.username == username and session.transitions.is_connected():
                log.info("disconnecting %s (client %s): its credentials changed", username, session.client_id)
                session.will_flag = False
                await handler.handle_connection_closed()

    # amqtt's private methods, overridden: their names and signatures are checked by
    # tests/broker/test_embedded_amqtt_contract.py against the pinned amqtt.

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # On every connection amqtt calls this for each filter any client subscribed to, which sent a
        # device the retained messages of others (their presence, their signed desired models).
        if any(holder is session for holder, _ in self.subscriptions.get(subscription[0], ())):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _handle_unsubscription(
        self, client_session: Session, handler: BrokerProtocolHandler, unsubscribe_waiter: asyncio.Future[Any]
    ) -> None:
        # amqtt has no hook here: a refused unsubscribe is acknowledged and the subscription kept.
        request = unsubscribe_waiter.result()
        username = client_session.username
        request.topics = [t for t in request.topics if self.dynsec.may_unsubscribe(username, t)]
        await super()._handle_unsubscription(client_session, handler, unsubscribe_waiter)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # amqtt ends the client's message loop, not its connection, at a `$` topic.
        message = wait_deliver.result()
        if message is None or not message.topic.startswith("$"):
            result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
            return result
        if message.topic == CONTROL_TOPIC and self.dynsec.may_publish(client_session.username, CONTROL_TOPIC):
            await self.serve_control(handler, bytes(message.data))
        else:
            log.info("dropped a publish of %s to %s", client_session.client_id, message.topic)
        return True

    async def serve_control(self, handler: BrokerProtocolHandler, payload: bytes) -> None:
        """Run a control message and answer the client that sent it (only it, like mosquitto)."""
        outcome = self.dynsec.execute(payload)
        if outcome.changed:
            try:
                self.save_state(self.dynsec)
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
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

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
        broker = _DynsecBroker(state, self.state.save)
        await broker.start()
        accept = functools.partial(self._accept, broker)
        try:
            server = await asyncio.start_server(accept, self.host, self._port, reuse_address=True)
        except OSError as exc:
            await broker.shutdown()
            raise EmbeddedBrokerError(f"cannot listen on {self.host}:{self._port}: {exc}") from None
        self._port = server.sockets[0].getsockname()[1]
        self._broker, self._server = broker, server
        log.info("embedded broker listening on %s:%d, state in %s", self.host, self._port, self.state.path)

    async def stop(self) -> None:
        """Disconnect every client and stop listening (the state is already saved)."""
        await self._end(abort=False)

    async def kill(self) -> None:
        """Stop as a killed process would, to its clients: connections cut, nothing sent."""
        await self._end(abort=True)

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

    async def _accept(
        self, broker: _DynsecBroker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection: its CONNECT is checked here, then amqtt reads it again and serves the
        client (`external_connected`, amqtt's entry for connections accepted by another server)."""
        self._connections.add(writer)
        gate = _Gate(reader, self._max_packet_size)
        try:
            connect = await asyncio.wait_for(gate.packet(), CONNECT_TIMEOUT)
            if not connect:
                return  # closed by the client, or by the gate (which said why)
            hello = Hello.parse(connect)
            code = await broker.admit(hello)
            if code != ACCEPTED:
                log.info("refused %r as %r (CONNACK %d)", hello.username, hello.client_id, code)
                writer.write(bytes([0x20, 2, 0, code]))  # CONNACK: no session present, refused
                await writer.drain()
                return
            gate.silence = math.ceil(hello.keepalive * 1.5) or None  # MQTT 3.1.2.10: 1.5 keepalives
            gate.unread(connect)
            await broker.external_connected(gate, StreamWriterAdapter(writer), LISTENER)
        except (ValueError, OSError) as exc:  # OSError: TimeoutError, or the client went away
            log.info("closing a connection without a valid CONNECT: %s", str(exc) or "timed out")
        finally:
            gate.close()
            self._connections.discard(writer)
            writer.close()

    async def _end(self, *, abort: bool) -> None:
        broker, server, self._broker, self._server = self._broker, self._server, None, None
        if broker is None or server is None:
            return
        server.close()
        if abort:
            for writer in list(self._connections):
                writer.transport.abort()
        await broker.shutdown()
        for writer in list(self._connections):
            writer.close()  # those still in their CONNECT
        await server.wait_closed()
