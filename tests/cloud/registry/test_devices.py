"""Registry devices: provisioning stores only a hash, authentication, revocation, listing, artifact offers."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from cloud.artifacts import LocalArtifactStore
from cloud.exceptions import ConflictError, NotFoundError, RegistryError
from cloud.registry import devices, models, rollouts
from cloud.registry.tables import (
    Device,
    DeviceStatus,
    Model,
    Presence,
    RolloutState,
    RolloutTarget,
    TargetState,
)
from tests.cloud.factories import make_cloud_model, make_cohort, make_device, make_edge_model


def approved_edge(session: Session, store: LocalArtifactStore, cohort_id: str = "kitchen") -> Model:
    """An approved edge model of the line, with its teacher."""
    teacher = make_cloud_model(session, store, cohort_id)
    edge = make_edge_model(session, store, teacher_id=teacher.id, cohort_id=cohort_id)
    return models.decide(session, edge.id, approve=True)


def test_provision_stores_only_the_sha256_of_the_secret(session: Session) -> None:
    # Prepare
    make_cohort(session)

    # Execute
    device, secret = devices.provision_device(session, device_id="cam-a", cohort_id="kitchen")
    session.commit()
    stored = session.execute(text("SELECT * FROM device WHERE id = 'cam-a'")).one()

    # Assert
    assert len(secret) >= 43  # 256 random bits, URL-safe base64
    assert device.credential_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert all(secret not in str(value) for value in stored)
    assert device.status is DeviceStatus.active
    assert device.presence is Presence.unknown


def test_provision_refuses_an_id_in_the_services_namespace(session: Session) -> None:
    make_cohort(session)
    with pytest.raises(RegistryError, match="cloud's own services"):
        devices.provision_device(session, device_id="diredi-ingest-1", cohort_id="kitchen")


def test_provision_gives_every_device_a_different_secret(session: Session) -> None:
    # Prepare
    make_cohort(session)

    # Execute
    _, first = make_device(session, "cam-a")
    _, second = make_device(session, "cam-b")

    # Assert
    assert first != second


def test_authenticate_accepts_the_right_secret(session: Session) -> None:
    # Prepare
    make_cohort(session)
    _, secret = make_device(session, "cam-a")
    session.commit()

    # Execute
    device = devices.authenticate_device(session, "cam-a", secret)

    # Assert
    assert device is not None
    assert device.id == "cam-a"


def test_authenticate_refuses_a_wrong_secret_or_an_unknown_device(session: Session) -> None:
    # Prepare
    make_cohort(session)
    _, secret = make_device(session, "cam-a")
    _, other = make_device(session, "cam-b")

    # Execute
    results = [
        devices.authenticate_device(session, "cam-a", other),
        devices.authenticate_device(session, "cam-a", secret + "x"),
        devices.authenticate_device(session, "cam-a", ""),
        devices.authenticate_device(session, "cam-zz", secret),
    ]

    # Assert
    assert results == [None, None, None, None]


def test_authenticate_refuses_a_revoked_device(session: Session) -> None:
    # Prepare
    make_cohort(session)
    _, secret = make_device(session, "cam-a")

    # Execute
    revoked = devices.revoke_device(session, "cam-a")
    session.commit()

    # Assert
    assert revoked.status is DeviceStatus.revoked
    assert revoked.revoked_at is not None
    assert revoked.presence is Presence.offline
    assert devices.authenticate_device(session, "cam-a", secret) is None


def test_revoking_twice_or_an_unknown_device_is_refused(session: Session) -> None:
    # Prepare
    make_cohort(session)
    make_device(session, "cam-a")
    devices.revoke_device(session, "cam-a")

    # Execute / Assert
    with pytest.raises(ConflictError):
        devices.revoke_device(session, "cam-a")
    with pytest.raises(NotFoundError):
        devices.revoke_device(session, "cam-zz")


def test_a_duplicate_device_id_is_a_conflict_even_after_revocation(session: Session) -> None:
    # Prepare
    make_cohort(session)
    make_cohort(session, "hall")
    make_device(session, "cam-a")
    make_device(session, "cam-b")
    devices.revoke_device(session, "cam-b")

    # Execute / Assert
    with pytest.raises(ConflictError):
        devices.provision_device(session, device_id="cam-a", cohort_id="hall")
    with pytest.raises(ConflictError):
        devices.provision_device(session, device_id="cam-b", cohort_id="kitchen")


def test_a_device_of_an_unknown_cohort_is_not_found(session: Session) -> None:
    # Execute / Assert
    with pytest.raises(NotFoundError) as caught:
        devices.provision_device(session, device_id="cam-a", cohort_id="nowhere")
    assert caught.value.kind == "cohort"
    assert session.get(Device, "cam-a") is None


def test_a_duplicate_cohort_is_a_conflict(session: Session) -> None:
    # Prepare
    make_cohort(session)

    # Execute / Assert
    with pytest.raises(ConflictError):
        make_cohort(session)


def test_list_devices_filters_and_pages_with_totals(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    make_cohort(session, "hall")
    edge = approved_edge(session, store)
    for name in ("cam-e", "cam-a", "cam-d", "cam-b", "cam-c"):
        make_device(session, name)
    make_device(session, "hall-1", "hall")
    devices.revoke_device(session, "cam-d")
    devices.get_device(session, "cam-b").presence = Presence.online
    devices.get_device(session, "cam-c").reported_model_id = edge.id
    session.commit()

    # Execute
    first, total = devices.list_devices(session, limit=2, offset=0, cohort_id="kitchen")
    last, last_total = devices.list_devices(session, limit=2, offset=4, cohort_id="kitchen")
    everyone, everyone_total = devices.list_devices(session, limit=100, offset=0)
    revoked, revoked_total = devices.list_devices(session, limit=10, offset=0, status=DeviceStatus.revoked)
    online, _ = devices.list_devices(session, limit=10, offset=0, presence=Presence.online)
    running, _ = devices.list_devices(session, limit=10, offset=0, model_id=edge.id)
    past_end, past_end_total = devices.list_devices(session, limit=10, offset=50)

    # Assert
    assert [d["id"] for d in first] == ["cam-a", "cam-b"] and total == 5
    assert [d["id"] for d in last] == ["cam-e"] and last_total == 5
    assert [d["id"] for d in everyone] == ["cam-a", "cam-b", "cam-c", "cam-d", "cam-e", "hall-1"]
    assert everyone_total == 6
    assert [d["id"] for d in revoked] == ["cam-d"] and revoked_total == 1
    assert [d["id"] for d in online] == ["cam-b"]
    assert [d["id"] for d in running] == ["cam-c"]
    assert list(past_end) == [] and past_end_total == 6


def test_listings_of_the_same_shape_each_follow_their_own_filter_values(session: Session) -> None:
    # The listing's statement is built once per combination of filters; the values are bound per call.
    # Prepare
    make_cohort(session)
    make_cohort(session, "hall")
    for name, cohort in (("cam-a", "kitchen"), ("hall-1", "hall"), ("hall-2", "hall")):
        make_device(session, name, cohort)
    devices.get_device(session, "hall-2").presence = Presence.online
    session.commit()

    # Execute
    kitchen, kitchen_total = devices.list_devices(session, limit=10, offset=0, cohort_id="kitchen")
    hall, hall_total = devices.list_devices(session, limit=10, offset=0, cohort_id="hall")
    hall_online, _ = devices.list_devices(
        session, limit=10, offset=0, cohort_id="hall", presence=Presence.online
    )
    kitchen_online, _ = devices.list_devices(
        session, limit=10, offset=0, cohort_id="kitchen", presence=Presence.online
    )
    past_end, past_end_total = devices.list_devices(session, limit=10, offset=50, cohort_id="hall")

    # Assert
    assert [d["id"] for d in kitchen] == ["cam-a"] and kitchen_total == 1
    assert [d["id"] for d in hall] == ["hall-1", "hall-2"] and hall_total == 2
    assert [d["id"] for d in hall_online] == ["hall-2"]
    assert kitchen_online == []
    assert past_end == [] and past_end_total == 2
    assert "credential_hash" not in hall[0]
    assert (hall[1]["presence"], hall[1]["status"]) == ("online", "active")  # enums as text, on any backend
    assert type(hall[1]["presence"]) is str and type(hall[1]["status"]) is str


def test_a_listing_sees_what_the_session_has_not_flushed_yet(session: Session) -> None:
    # Prepare
    make_cohort(session)
    make_device(session, "cam-a")
    session.commit()
    devices.get_device(session, "cam-a").presence = Presence.online  # pending in the session

    # Execute
    online, total = devices.list_devices(session, limit=10, offset=0, presence=Presence.online)

    # Assert
    assert [d["id"] for d in online] == ["cam-a"] and total == 1


def test_list_cohorts_pages_with_totals(session: Session) -> None:
    # Prepare
    for name in ("porch", "hall", "kitchen"):
        make_cohort(session, name)

    # Execute
    page, total = devices.list_cohorts(session, limit=2, offset=1)

    # Assert
    assert [c.id for c in page] == ["kitchen", "porch"]
    assert total == 3


def test_offered_to_covers_the_desired_and_the_reported_model(
    session: Session, store: LocalArtifactStore
) -> None:
    # Prepare
    make_cohort(session)
    desired = approved_edge(session, store)
    reported = approved_edge(session, store)
    unrelated = approved_edge(session, store)
    device, _ = make_device(session, "cam-a")
    other, _ = make_device(session, "cam-b")
    device.desired_model_id, device.reported_model_id = desired.id, reported.id
    other.desired_model_id = unrelated.id
    session.commit()

    # Execute / Assert
    assert devices.offered_to(session, device, desired.sha256)
    assert devices.offered_to(session, device, reported.sha256)
    assert not devices.offered_to(session, device, unrelated.sha256)
    assert not devices.offered_to(session, device, "0" * 64)
    assert not devices.offered_to(session, other, desired.sha256)


def test_offered_to_covers_live_rollout_targets_only(session: Session, store: LocalArtifactStore) -> None:
    # Prepare
    make_cohort(session)
    edge = approved_edge(session, store)
    names = ["cam-a", "cam-b", "cam-c", "cam-d", "cam-e"]
    for name in [*names, "cam-f"]:
        make_device(session, name)
    rollout = rollouts.create_rollout(session, model_id=edge.id, waves=[names], created_by="test")
    states = [
        TargetState.pending,
        TargetState.offered,
        TargetState.installed,
        TargetState.failed,
        TargetState.rolled_back,
    ]
    for name, state in zip(names, states, strict=True):
        session.get_one(RolloutTarget, (rollout.id, name)).state = state
    session.commit()

    # Execute
    offered = {
        name: devices.offered_to(session, devices.get_device(session, name), edge.sha256)
        for name in [*names, "cam-f"]
    }

    # Assert
    assert offered == {
        "cam-a": True,
        "cam-b": True,
        "cam-c": True,
        "cam-d": False,
        "cam-e": False,
        "cam-f": False,
    }


@pytest.mark.parametrize(
    ("state", "offered"),
    [
        (RolloutState.running, True),
        (RolloutState.paused, True),
        (RolloutState.completed, True),
        (RolloutState.halted, False),
        (RolloutState.rolled_back, False),
    ],
)
def test_a_withdrawn_rollout_offers_its_model_to_no_one(
    session: Session, store: LocalArtifactStore, state: RolloutState, offered: bool
) -> None:
    # Prepare: a target not yet told it was withdrawn
    make_cohort(session)
    edge = approved_edge(session, store)
    make_device(session, "cam-a")
    rollout = rollouts.create_rollout(session, model_id=edge.id, waves=[["cam-a"]], created_by="test")
    rollout.state = state
    session.commit()

    # Execute / Assert
    assert devices.offered_to(session, devices.get_device(session, "cam-a"), edge.sha256) is offered


def test_behind_on_trust_counts_active_devices_below_the_version_or_without_one(session: Session) -> None:
    # Prepare: cam-a never reported a version; cam-old is revoked (and behind), so it does not count
    make_cohort(session)
    for name in ("cam-a", "cam-b", "cam-c", "cam-d", "cam-old"):
        make_device(session, name)
    devices.report_trust(session, {"cam-b": 1, "cam-c": 2, "cam-d": 3, "cam-old": 1})
    devices.revoke_device(session, "cam-old")
    session.commit()

    # Execute
    behind = {version: devices.behind_on_trust(session, version) for version in (1, 2, 3, 4)}

    # Assert
    assert behind == {1: 1, 2: 2, 3: 3, 4: 4}
    assert devices.known_devices(session, ["cam-c", "cam-old"]) == {
        "cam-c": devices.KnownDevice(DeviceStatus.active, None, 2),
        "cam-old": devices.KnownDevice(DeviceStatus.revoked, None, 1),
    }


def test_behind_on_trust_is_zero_for_an_empty_or_caught_up_fleet(session: Session) -> None:
    # Prepare
    make_cohort(session)
    empty = devices.behind_on_trust(session, 1)
    make_device(session, "cam-a")
    devices.report_trust(session, {"cam-a": 5})
    session.commit()

    # Execute / Assert
    assert (empty, devices.behind_on_trust(session, 5), devices.behind_on_trust(session, 6)) == (0, 0, 1)
