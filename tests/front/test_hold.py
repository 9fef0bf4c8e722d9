"""The front holds: half-open and slow clients cost nginx a connection each and never uvicorn, nginx's
timeouts and per-address limits cut them, and the API keeps answering meanwhile (docs/api-front.md)."""

from __future__ import annotations

import socket
import time

import pytest

from tests.front.nginx import (
    API_OPEN_FILES,
    Front,
    assert_problem,
    connect,
    get,
    needs_nginx,
    peek,
    read_answer,
    upstream_connections,
)
from tests.polling import wait_until

pytestmark = needs_nginx

HALF_OPEN = 1100  # the review's number: more than uvicorn's 1,024 descriptors
SLOW_CLIENTS = 50  # the review's number: more than the 32 connections an address may hold
TRICKLE_S = 0.5  # a slow client's pace: one byte or header line this often
# How long past a timeout a test waits for nginx to act on it: generous, for a loaded machine.
SLACK_S = 60.0


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_1100_half_open_connections_leave_the_api_answering_and_are_dropped_after_the_header_timeout(
    front: Front, open_files: int
) -> None:
    # Prepare
    if open_files < HALF_OPEN + 200:
        pytest.skip(f"the descriptor limit here is {open_files}: too few for {HALF_OPEN} connections")
    assert API_OPEN_FILES < HALF_OPEN  # uvicorn alone would be starved by them
    sockets: list[socket.socket] = []
    try:
        # Execute: connections that start a request and never finish its headers, then /healthz
        for _ in range(HALF_OPEN):
            sockets.append(connect(front.plain_port))
            sockets[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: front\r\nX-Unfinished: ")
        answers = [get(front.plain_port, "/healthz") for _ in range(5)]
        open_meanwhile = sum(peek(s) is None for s in sockets)
        wait_until(
            lambda: all(peek(s) is not None for s in sockets),
            front.limits.header_timeout_s + SLACK_S,
            lambda: (
                f"{sum(peek(s) is None for s in sockets)} of {HALF_OPEN} half-open connections still open"
            ),
        )
        outcomes = [peek(s) for s in sockets]
    finally:
        close_all(sockets)

    # Assert: /healthz answered from the same address while more half-open connections than uvicorn has
    # descriptors were open (not counted by limit_conn: their headers were never read); nginx then closed
    # every one without a word
    assert [(a.status, a.json()) for a in answers] == [(200, {"status": "ok"})] * 5
    assert open_meanwhile > API_OPEN_FILES, f"only {open_meanwhile} were still open when /healthz answered"
    assert outcomes == [b""] * HALF_OPEN


def test_headers_trickled_line_by_line_are_cut_at_the_header_timeout_all_the_same(front: Front) -> None:
    # Prepare: 20 clients that keep sending a header line every half second, never the blank line
    sockets = [connect(front.plain_port) for _ in range(20)]
    lines = [0] * len(sockets)
    try:
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: front\r\n")

        # Execute
        deadline = time.monotonic() + front.limits.header_timeout_s + SLACK_S
        while time.monotonic() < deadline and any(peek(s) is None for s in sockets):
            for i, sock in enumerate(sockets):
                if peek(sock) is None:
                    try:
                        sock.send(b"X-Line-%d: more\r\n" % lines[i])
                        lines[i] += 1
                    except OSError:
                        pass
            time.sleep(TRICKLE_S)
        outcomes = [peek(s) for s in sockets]
    finally:
        close_all(sockets)

    # Assert: the header timeout counts from the connection, not from the last line (a per-read timeout
    # would hold these forever); each was closed without an answer, after it had sent several lines
    assert outcomes == [b""] * len(sockets), f"lines sent: {lines}"
    assert min(lines) >= 2


def test_slow_bodies_from_one_address_hold_at_most_its_limit_and_never_uvicorn_then_are_cut_when_they_stall(
    front: Front,
) -> None:
    # Prepare: complete headers, a large Content-Length, one byte of the body
    limit = front.limits.connections_per_address
    assert limit < SLOW_CLIENTS
    head = b"POST /api/v1/cohorts HTTP/1.1\r\nHost: front\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 100000\r\n\r\n{"
    clients = [connect(front.plain_port) for _ in range(SLOW_CLIENTS)]
    try:
        for sock in clients:
            sock.sendall(head)

        # Execute: those above the limit are answered at once; the rest are fed a byte every half second
        # for twice the body timeout, while other requests come; then they stall
        wait_until(
            lambda: sum(peek(s) is not None for s in clients) >= SLOW_CLIENTS - limit,
            SLACK_S,
            lambda: f"{sum(peek(s) is not None for s in clients)} answered",
        )
        held = [s for s in clients if peek(s) is None]
        refused = [read_answer(s) for s in clients if s not in held]
        other_address, to_upstream = [], []
        fed_until = time.monotonic() + 2 * front.limits.body_timeout_s
        while time.monotonic() < fed_until:
            for sock in held:
                try:
                    sock.send(b" ")
                except OSError:
                    pass
            other_address.append(get(front.plain_port, "/healthz", source="127.0.0.2").status)
            to_upstream.append(upstream_connections(front.upstream_port))
            time.sleep(TRICKLE_S)
        same_address = get(front.plain_port, "/healthz")
        held_while_fed = sum(peek(s) is None for s in held)
        wait_until(
            lambda: all(peek(s) is not None for s in held),
            front.limits.body_timeout_s + SLACK_S,
            lambda: f"{sum(peek(s) is None for s in held)} of {len(held)} stalled bodies still open",
        )
        outcomes = [peek(s) for s in held]
    finally:
        close_all(clients)

    # Assert: the address held exactly its limit, the rest got 429 problems (as did its next request);
    # another address was served throughout; the held bodies reached no uvicorn connection (nginx reads a
    # body whole before it connects upstream); once they stalled, the body timeout cut each one
    assert (len(refused), len(held)) == (SLOW_CLIENTS - limit, limit)
    for answer in [*refused, same_address]:
        assert_problem(answer, 429)
        assert answer.headers["Retry-After"] == "1"
    assert other_address and set(other_address) == {200}
    assert held_while_fed == limit
    assert max(to_upstream) < 8, to_upstream
    assert outcomes == [b""] * limit
