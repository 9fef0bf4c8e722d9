"""free_ports: distinct, bindable loopback ports, outside the range outgoing connections draw from."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cloud import children
from cloud.children import free_ports


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    # Execute
    ports = free_ports(5)

    # Assert
    assert len(set(ports)) == 5
    ephemeral_low = int(children.EPHEMERAL_RANGE.read_text().split()[0])
    assert all(children.PORTS_BELOW_EPHEMERAL[0] <= port < ephemeral_low for port in ports), ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_candidate_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the first candidate is bound by someone else
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        monkeypatch.setattr(children, "_candidate_ports", lambda count: [busy, *range(24_000, 24_100)])

        # Execute
        ports = free_ports(2)

    # Assert
    assert busy not in ports and len(set(ports)) == 2


@pytest.mark.parametrize("content", ["", "garbage", "20001 60999"], ids=["empty", "garbage", "no-room-below"])
def test_an_unusable_range_falls_back_to_the_kernels_choice(
    content: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a range file that says nothing usable, or leaves no room below it
    bogus = tmp_path / "ip_local_port_range"
    bogus.write_text(content)
    monkeypatch.setattr(children, "EPHEMERAL_RANGE", bogus)

    # Execute
    ports = free_ports(3)

    # Assert: still three distinct ports, chosen by the kernel
    assert len(set(ports)) == 3 and all(port > 0 for port in ports)
