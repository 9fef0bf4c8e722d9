"""Registry presence: DESIGN §2's `conn` rule, ordered by sent_at, with the same result in any order."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from cloud.registry import devices
from cloud.registry.tables import Device
from cloud.registry.tables import Presence as Shown
from tests.cloud.factories import make_cohort, make_device
from wire.messages import Presence, PresenceState

State = tuple[Shown, str | None, datetime | None]  # presence, presence_conn, presence_at


def online(conn: str, at: datetime, device_id: str = "cam-a") -> Presence:
    """The `online` a device publishes once connection `conn` is up."""
    return Presence(device_id=device_id, state=PresenceState.online, conn=conn, sent_at=at)


def offline(conn: str, at: datetime, device_id: str = "cam-a") -> Presence:
    """An `offline` of connection `conn`: its will, or a clean goodbye."""
    return Presence(device_id=device_id, state=PresenceState.offline, conn=conn, sent_at=at)


def apply(session: Session, *messages: Presence, device_id: str | None = None) -> list[bool]:
    """Apply `messages` in this order as the ingest does (to `device_id` if given); what each changed."""
    return [
        devices.apply_presence(
            session,
            device_id or m.device_id,
            online=m.state is PresenceState.online,
            conn=m.conn,
            sent_at=m.sent_at,
        )
        for m in messages
    ]


def state_of(session: Session, device_id: str = "cam-a") -> State:
    """The device's stored presence, read back from the database."""
    session.commit()
    session.expire_all()
    device = session.get_one(Device, device_id)
    return device.presence, device.presence_conn, device.presence_at


def kitchen_device(session: Session, device_id: str = "cam-a") -> datetime:
    """The kitchen cohort with one device; return the current time."""
    make_cohort(session)
    make_device(session, device_id)
    session.commit()
    return datetime.now(UTC)


def test_the_first_online_sets_presence_conn_and_time(session: Session) -> None:
    # Prepare
    now = kitchen_device(session)

    # Execute
    changed = apply(session, online("c1", now))

    # Assert
    assert changed == [True]
    assert state_of(session) == (Shown.online, "c1", now)


def test_the_will_of_the_current_connection_takes_the_device_offline(session: Session) -> None:
    # Prepare (the will is stamped when the connection is made, like the online that follows it)
    now = kitchen_device(session)
    apply(session, online("c1", now))

    # Execute
    changed = apply(session, offline("c1", now))

    # Assert
    assert changed == [True]
    assert state_of(session) == (Shown.offline, "c1", now)


def test_a_clean_goodbye_later_than_the_online_takes_the_device_offline(session: Session) -> None:
    # Prepare
    now = kitchen_device(session)
    apply(session, online("c1", now))

    # Execute
    changed = apply(session, offline("c1", now + timedelta(minutes=5)))

    # Assert
    assert changed == [True]
    assert state_of(session) == (Shown.offline, "c1", now + timedelta(minutes=5))


@pytest.mark.parametrize("will_after", [timedelta(0), timedelta(seconds=3)], ids=["at-connect", "later"])
def test_a_stale_will_of_an_old_connection_keeps_the_device_online(
    session: Session, will_after: timedelta
) -> None:
    # Prepare: connection c1 died silently, the device reconnected as c2 before the broker noticed
    now = kitchen_device(session)
    apply(session, online("c1", now), online("c2", now + timedelta(seconds=10)))

    # Execute: the broker publishes c1's will only now
    changed = apply(session, offline("c1", now + will_after))

    # Assert
    assert changed == [False]
    assert state_of(session) == (Shown.online, "c2", now + timedelta(seconds=10))


def test_an_older_online_applied_after_a_newer_one_does_not_win(session: Session) -> None:
    # Prepare
    now = kitchen_device(session)
    apply(session, online("c2", now + timedelta(seconds=30)))

    # Execute
    changed = apply(session, online("c1", now))

    # Assert
    assert changed == [False]
    assert state_of(session) == (Shown.online, "c2", now + timedelta(seconds=30))


def test_an_offline_older_than_the_stored_presence_is_ignored(session: Session) -> None:
    # Prepare: the device went offline and came back on the same connection id (a clean reconnect)
    now = kitchen_device(session)
    apply(session, online("c1", now + timedelta(seconds=20)))

    # Execute
    changed = apply(session, offline("c1", now))

    # Assert
    assert changed == [False]
    assert state_of(session) == (Shown.online, "c1", now + timedelta(seconds=20))


def test_a_will_applied_before_its_own_online_still_ends_offline(session: Session) -> None:
    # Prepare: two ingests, or a retained will seen first; the online arrives afterwards
    now = kitchen_device(session)

    # Execute
    changed = apply(session, offline("c1", now), online("c1", now))

    # Assert
    assert changed == [True, False]
    assert state_of(session) == (Shown.offline, "c1", now)


def test_the_same_presence_applied_twice_changes_nothing_the_second_time(session: Session) -> None:
    # Prepare
    now = kitchen_device(session)
    apply(session, online("c1", now), offline("c1", now + timedelta(seconds=1)))

    # Execute (a redelivery, or the second ingest)
    changed = apply(session, online("c1", now), offline("c1", now + timedelta(seconds=1)))

    # Assert
    assert changed[0] is False
    assert state_of(session) == (Shown.offline, "c1", now + timedelta(seconds=1))


def sequences(now: datetime) -> dict[str, tuple[list[Presence], State]]:
    """Presence histories in the order a device sent them, and the state each must end in."""
    at = [now + timedelta(seconds=s) for s in (0, 10, 20)]
    return {
        "reconnect, then the last will": (
            [online("c1", at[0]), offline("c1", at[0]), online("c2", at[1]), offline("c2", at[1])],
            (Shown.offline, "c2", at[1]),
        ),
        "reconnect before the broker noticed": (
            [online("c1", at[0]), online("c2", at[1]), offline("c1", at[0])],
            (Shown.online, "c2", at[1]),
        ),
        "goodbye, then back": (
            [online("c1", at[0]), offline("c1", at[1]), online("c2", at[2])],
            (Shown.online, "c2", at[2]),
        ),
        "two reconnects, the last one ended": (
            [online("c1", at[0]), online("c2", at[1]), offline("c2", at[2]), offline("c1", at[0])],
            (Shown.offline, "c2", at[2]),
        ),
    }


def told(order: tuple[Presence, ...], now: datetime) -> str:
    """An order of presence messages in words, for a failure to name it."""
    return ", ".join(f"{m.state} {m.conn} +{(m.sent_at - now).seconds}s" for m in order)


@pytest.mark.parametrize("name", list(sequences(datetime.now(UTC))))
def test_presence_ends_the_same_in_every_order(session: Session, name: str) -> None:
    # Prepare: one device per order, so every order starts from a device never seen
    now = kitchen_device(session, "cam-in-order")
    history, expected = sequences(now)[name]
    orders = list(itertools.permutations(history))
    for i in range(len(orders)):
        make_device(session, f"cam-order-{i}")
    session.commit()

    # Execute
    apply(session, *history, device_id="cam-in-order")
    for i, order in enumerate(orders):
        apply(session, *order, device_id=f"cam-order-{i}")

    # Assert
    assert state_of(session, "cam-in-order") == expected
    ends = {told(order, now): state_of(session, f"cam-order-{i}") for i, order in enumerate(orders)}
    assert {order: end for order, end in ends.items() if end != expected} == {}


def test_presence_of_a_revoked_device_changes_nothing(session: Session) -> None:
    # Prepare
    now = kitchen_device(session)
    devices.revoke_device(session, "cam-a")
    session.commit()

    # Execute
    changed = apply(session, online("c1", now), offline("c1", now + timedelta(seconds=1)))

    # Assert
    assert changed == [False, False]
    assert state_of(session) == (Shown.offline, None, None)
