"""A client cannot choose the address the API sees: the front overwrites X-Forwarded-For with the peer's
own, which uvicorn trusts from 127.0.0.1, and the API's failed-authentication limit counts per that."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.children import free_ports
from tests.front.nginx import (
    ROOT,
    Front,
    assert_problem,
    echo_process,
    exchange,
    get,
    needs_nginx,
    running_front,
)

pytestmark = needs_nginx

GUARD = ROOT / "cloud" / "api" / "guard.py"
WRONG_KEYS = 200  # far more than the API's failed-authentication burst (20 by default)


@pytest.fixture(scope="module")
def echo_front(tmp_path_factory: pytest.TempPathFactory, lab_certs: Path, open_files: int) -> Iterator[Front]:
    """The front in front of uvicorn serving tests/front/echo.py, which answers with what uvicorn saw."""
    directory = tmp_path_factory.mktemp("echo")
    (port,) = free_ports(1)
    echo = echo_process(directory, port)
    echo.start([port])
    try:
        with running_front(directory / "front", upstream_port=port, certs=lab_certs) as front:
            yield front
    finally:
        echo.stop()


def test_uvicorn_behind_the_front_sees_the_peer_whatever_the_client_claims(echo_front: Front) -> None:
    # Prepare: a client on 127.0.0.2 that claims to be elsewhere, and to have come over TLS
    claims = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "Forwarded": "for=203.0.113.8"}
    twice = b"GET /who HTTP/1.1\r\nHost: front\r\nConnection: close\r\n"
    twice += b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"

    # Execute
    seen = get(echo_front.plain_port, "/who", source="127.0.0.2", headers=claims).json()
    seen_twice = exchange(echo_front.plain_port, twice, source="127.0.0.3").json()

    # Assert: uvicorn's client address is the peer nginx saw; the client's own headers are gone
    assert (seen["client"], seen["scheme"]) == ("127.0.0.2", "http")
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.2"
    assert "forwarded" not in seen["headers"]
    assert seen_twice["client"] == "127.0.0.3"
    assert seen_twice["headers"]["x-forwarded-for"] == "127.0.0.3"


@pytest.mark.skipif(
    not GUARD.exists(),
    reason="cloud/api/guard.py (the API's failed-authentication limit per source) is not in this tree",
)
def test_spoofed_x_forwarded_for_does_not_escape_the_apis_failed_authentication_limit(front: Front) -> None:
    # Execute: wrong keys from 127.0.0.3, each claiming another source, until the API refuses (bounded)
    statuses = []
    for i in range(WRONG_KEYS):
        claim = {"Authorization": f"Bearer drk_wrong{i}", "X-Forwarded-For": f"198.51.100.{i % 250 + 1}"}
        limited = get(front.plain_port, "/api/v1/devices", source="127.0.0.3", headers=claim)
        statuses.append(limited.status)
        if limited.status == 429:
            break
    as_neighbour = {"Authorization": "Bearer drk_wrong", "X-Forwarded-For": "127.0.0.4"}
    still = get(front.plain_port, "/api/v1/devices", source="127.0.0.3", headers=as_neighbour)
    neighbour = get(
        front.plain_port, "/api/v1/devices", source="127.0.0.4", headers={"Authorization": "Bearer x"}
    )

    # Assert: every guess counted against 127.0.0.3, whose source it claimed notwithstanding, and the API
    # (not the front's rate limit) refused it; claiming the neighbour's address does not help, and the
    # neighbour itself is not limited
    assert statuses[-1] == 429 and set(statuses[:-1]) == {401}, statuses
    assert "authentication" in str(assert_problem(limited, 429)["detail"])
    assert still.status == 429
    assert neighbour.status == 401
