"""wire.trust: the TUF-style trust chain's rules (each step signed by the old and the new keys, no gap,
no way back, no document from the future), strict parsing, and garbage refused as a ContractError."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from wire import ContractError
from wire.strictjson import strict_json
from wire.trust import (
    MAX_CHAIN,
    MAX_CLOCK_SKEW,
    MAX_TRUST_BYTES,
    KeySignature,
    TrustChain,
    TrustDocument,
    check_issued_at,
    key_id_of,
    next_trust,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)  # the device's clock: after every document below was issued


@dataclass(frozen=True)
class Signer:
    """One Ed25519 key as the trust chain names it."""

    private: Ed25519PrivateKey

    @property
    def raw(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    @property
    def encoded(self) -> str:
        return base64.b64encode(self.raw).decode()

    def sign(self, document: TrustDocument) -> KeySignature:
        """This key's signature over `document`'s canonical form."""
        signature = self.private.sign(document.signed_bytes())
        return KeySignature(key_id=self.key_id, signature=base64.b64encode(signature).decode())


def signer(name: str) -> Signer:
    """A key derived from `name`, the same in every run."""
    return Signer(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest()))


A, B, C, X = signer("a"), signer("b"), signer("c"), signer("stolen-or-rogue")


def document(
    version: int,
    keys: Sequence[Signer],
    threshold: int,
    signed_by: Sequence[Signer],
    issued_at: datetime | None = None,
) -> TrustDocument:
    """Trust document `version` listing `keys`, signed by each of `signed_by` (in that order), issued
    `version` minutes after T0 unless `issued_at` says otherwise."""
    unsigned = TrustDocument(
        version=version,
        keys={k.key_id: k.encoded for k in keys},
        threshold=threshold,
        issued_at=issued_at or T0 + timedelta(minutes=version),
    )
    return unsigned.model_copy(update={"signatures": [k.sign(unsigned) for k in signed_by]})


def held(*keys: Signer) -> dict[str, bytes]:
    """What a device holding `keys` trusts."""
    return {k.key_id: k.raw for k in keys}


def payload(*documents: TrustDocument) -> bytes:
    """The chain of `documents` as received on the trust topic."""
    return TrustChain(documents=list(documents)).to_json().encode()


def receive(
    raw: bytes | str, version: int = 1, keys: Sequence[Signer] = (A,), threshold: int = 1
) -> TrustDocument | None:
    """What a device at `version` holding `keys` (V1 by default) reaches from a received chain."""
    return next_trust(held(*keys), threshold, version, TrustChain.from_bytes(raw), NOW)


# The fleet's history: v1 {A}; v2 adds B (a rotation); v3 drops A (a revocation).
V1 = document(1, [A], 1, [A])
V2 = document(2, [A, B], 2, [A, B])
V3 = document(3, [B], 1, [A, B])
HISTORY = payload(V1, V2, V3)


# --- the walk ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "keys", "threshold"),
    [(0, [A], 1), (1, [A], 1), (2, [A, B], 2)],
    ids=["from-0", "from-1", "from-2"],
)
def test_a_chain_walks_across_a_rotation_and_a_revocation_to_its_latest_version(
    version: int, keys: list[Signer], threshold: int
) -> None:
    # Execute
    reached = receive(HISTORY, version, keys, threshold)

    # Assert
    assert reached == V3
    assert reached is not None and reached.raw_keys() == held(B)
    assert reached.threshold == 1


def test_the_chain_round_trips_through_its_json() -> None:
    # Execute
    chain = TrustChain.from_bytes(HISTORY)

    # Assert
    assert chain == TrustChain(documents=[V1, V2, V3])
    assert chain.latest == V3
    assert json.loads(HISTORY)["schema"] == "diredi.trust-chain/1"
    assert json.loads(HISTORY)["documents"][0]["schema"] == "diredi.trust/1"


def test_the_signed_bytes_are_rfc8785_of_everything_but_the_signatures() -> None:
    # Prepare
    unsigned = V2.model_dump(mode="json", by_alias=True)
    del unsigned["signatures"]

    # Execute
    signed = V2.signed_bytes()

    # Assert
    assert signed == rfc8785.dumps(unsigned)
    assert V2.model_copy(update={"signatures": []}).signed_bytes() == signed
    assert b"signatures" not in signed


def test_key_id_of_is_the_first_16_hex_digits_of_the_keys_sha256() -> None:
    # Execute / Assert
    assert key_id_of(A.raw) == hashlib.sha256(A.raw).hexdigest()[:16] == A.key_id
    assert key_id_of(A.raw) != key_id_of(B.raw)


@pytest.mark.parametrize(
    "forged",
    [
        document(3, [A], 1, [A]),  # drops B
        document(3, [A, X], 1, [A, X]),  # swaps B for the thief's key
        document(3, [A, B, X], 2, [A, X]),  # adds the thief's key
        document(3, [X], 1, [A, X]),
    ],
    ids=["drop-b", "swap-b", "add-x", "only-x"],
)
def test_one_stolen_key_cannot_move_a_two_key_set(forged: TrustDocument) -> None:
    # Prepare: the device holds v2 ({A, B}, both must sign); the thief holds A (and a key of its own)
    chain = payload(V1, V2, forged)

    # Execute / Assert
    with pytest.raises(ContractError, match="1 valid signatures by the keys of version 2, 2 needed"):
        receive(chain, 2, [A, B], 2)


def test_a_new_key_must_sign_the_document_that_adds_it() -> None:
    # Prepare: v2 lists B and asks for two signatures, but only A signed
    unsigned_by_b = document(2, [A, B], 2, [A])

    # Execute / Assert
    with pytest.raises(ContractError, match="1 valid signatures by its own keys, 2 needed"):
        receive(payload(V1, unsigned_by_b))


@pytest.mark.parametrize(
    ("chain", "version", "keys", "threshold"),
    [
        (payload(V1, V2, V3), 3, [B], 1),  # nothing newer
        (payload(V1, V2), 3, [B], 1),  # an older chain, replayed
        (payload(V1), 2, [A, B], 2),
    ],
    ids=["same", "replayed-older", "first-only"],
)
def test_a_chain_with_nothing_newer_gives_none(
    chain: bytes, version: int, keys: list[Signer], threshold: int
) -> None:
    # Execute / Assert: valid signatures, but the device never goes back
    assert receive(chain, version, keys, threshold) is None


def test_a_chain_that_skips_the_next_version_is_refused() -> None:
    # Prepare: the device holds v1; the chain starts at v3 (v2 fell off the end)
    chain = payload(V3, document(4, [B, C], 2, [B, C]))

    # Execute / Assert
    with pytest.raises(ContractError, match="starts at version 3; this device holds 1"):
        receive(chain)


@pytest.mark.parametrize(
    "documents",
    [[V1, V3], [V2, V1], [V1, V1], [V1, V2, V2]],
    ids=["gap", "descending", "repeated", "repeated-last"],
)
def test_a_chain_of_versions_that_are_not_consecutive_is_refused(documents: list[TrustDocument]) -> None:
    # Prepare
    raw = json.dumps(
        {
            "schema": "diredi.trust-chain/1",
            "documents": [d.model_dump(mode="json", by_alias=True) for d in documents],
        }
    )

    # Execute / Assert
    with pytest.raises(ContractError, match="not consecutive"):
        TrustChain.from_bytes(raw)


def test_a_failing_step_refuses_the_whole_chain() -> None:
    # Prepare: v2 is fine, v3 is signed by A alone where v2 asks for two
    chain = payload(V1, V2, document(3, [B], 1, [A]))

    # Execute / Assert: no partial progress to v2
    with pytest.raises(ContractError, match="trust document 3 has 1 valid signatures"):
        receive(chain)
    assert receive(payload(V1, V2)) == V2


def impostor_under_as_id() -> TrustDocument:
    """v2 with a signature by X filed under A's key_id."""
    unsigned = document(2, [A, B], 2, [])
    signatures = [X.sign(unsigned).model_copy(update={"key_id": A.key_id}), B.sign(unsigned)]
    return unsigned.model_copy(update={"signatures": signatures})


def altered_after_signing() -> TrustDocument:
    """v2 signed by A and B, then C added to its keys."""
    return V2.model_copy(update={"keys": {**V2.keys, C.key_id: C.encoded}})


def flipped_bit() -> TrustDocument:
    """v2 with one bit of A's signature flipped."""
    signature = bytearray(base64.b64decode(V2.signatures[0].signature))
    signature[10] ^= 0x01
    entry = V2.signatures[0].model_copy(update={"signature": base64.b64encode(bytes(signature)).decode()})
    return V2.model_copy(update={"signatures": [entry, V2.signatures[1]]})


def signatures_of_another_document() -> TrustDocument:
    """v2 carrying the signatures A and B made on another document (a v2 with C as well)."""
    other = document(2, [A, B, C], 2, [A, B])
    return V2.model_copy(update={"signatures": other.signatures})


@pytest.mark.parametrize(
    "forged",
    [impostor_under_as_id, altered_after_signing, flipped_bit, signatures_of_another_document],
)
def test_a_forged_or_altered_signature_is_refused(forged: Callable[[], TrustDocument]) -> None:
    # Execute / Assert
    with pytest.raises(
        ContractError, match="trust document 2 has 0 valid signatures by the keys of version 1"
    ):
        receive(payload(V1, forged()))


def test_a_field_changed_in_the_json_after_signing_is_refused() -> None:
    # Prepare: the received bytes lower v2's threshold; the signatures were made over 2
    sent = json.loads(payload(V1, V2))
    sent["documents"][1]["threshold"] = 1

    # Execute / Assert
    with pytest.raises(ContractError, match="0 valid signatures"):
        receive(json.dumps(sent))


def test_a_signature_repeated_by_the_same_key_counts_once() -> None:
    # Prepare: the device holds {A, B} (two must sign); v2 carries A's valid signature twice
    unsigned = document(2, [A, B], 2, [])
    twice = unsigned.model_copy(update={"signatures": [A.sign(unsigned), A.sign(unsigned)]})

    # Execute
    signers = twice.signers(held(A, B))

    # Assert
    assert signers == {A.key_id}
    with pytest.raises(ContractError, match="1 valid signatures by the keys of version 1, 2 needed"):
        receive(payload(document(1, [A, B], 2, [A, B]), twice), 1, [A, B], 2)


def test_a_bad_signature_before_a_good_one_of_the_same_key_still_counts_the_good_one() -> None:
    # Prepare
    junk = KeySignature(key_id=A.key_id, signature=base64.b64encode(bytes(64)).decode())
    document_2 = V2.model_copy(update={"signatures": [junk, *V2.signatures]})

    # Execute / Assert
    assert document_2.signers(held(A, B)) == {A.key_id, B.key_id}
    assert receive(payload(V1, document_2)) == document_2


def test_a_signature_by_a_key_in_neither_set_is_not_counted() -> None:
    # Prepare: X signs v2 but is listed nowhere
    unsigned = document(2, [A, B], 2, [])
    with_x = unsigned.model_copy(update={"signatures": [A.sign(unsigned), X.sign(unsigned)]})

    # Execute / Assert
    assert with_x.signers(held(A, B)) == {A.key_id}
    with pytest.raises(ContractError, match="1 valid signatures by its own keys, 2 needed"):
        receive(payload(V1, with_x))


def raw_document(**changes: Any) -> dict[str, Any]:
    """V2 as JSON with `changes` applied (signatures kept)."""
    return {**V2.model_dump(mode="json", by_alias=True), **changes}


def chain_of(*documents: dict[str, Any]) -> str:
    """A chain's JSON holding `documents` as given."""
    return json.dumps({"schema": "diredi.trust-chain/1", "documents": list(documents)})


def test_a_threshold_above_its_keys_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValidationError, match="threshold 2 is more than its 1 keys"):
        TrustDocument(version=1, keys={A.key_id: A.encoded}, threshold=2, issued_at=T0)
    with pytest.raises(ContractError, match="threshold 3 is more than its 2 keys"):
        TrustChain.from_bytes(chain_of(raw_document(threshold=3)))


def test_a_key_listed_under_another_keys_id_is_refused() -> None:
    # Prepare: B's id, but A's public key (a device would check B's signatures against A)
    keys = {A.key_id: A.encoded, B.key_id: A.encoded}

    # Execute / Assert
    with pytest.raises(ValidationError, match=f"key {B.key_id} is not the id of its public key"):
        TrustDocument(version=1, keys=keys, threshold=1, issued_at=T0)
    with pytest.raises(ContractError, match=f"key {B.key_id} is not the id of its public key"):
        TrustChain.from_bytes(chain_of(raw_document(keys=keys)))


def test_a_chain_over_the_size_limit_is_refused_and_one_at_the_limit_is_read() -> None:
    # Prepare: the same chain padded with whitespace to the limit, and one byte over it
    at_limit = HISTORY + b" " * (MAX_TRUST_BYTES - len(HISTORY))
    over = at_limit + b" "

    # Execute / Assert
    assert TrustChain.from_bytes(at_limit).latest == V3
    with pytest.raises(ContractError, match=f"trust chain of {MAX_TRUST_BYTES + 1} bytes exceeds"):
        TrustChain.from_bytes(over)


def test_a_chain_longer_than_max_chain_is_refused() -> None:
    # Prepare: MAX_CHAIN + 1 consecutive documents, all validly signed by A
    documents = [
        document(v, [A], 1, [A]).model_dump(mode="json", by_alias=True) for v in range(1, MAX_CHAIN + 2)
    ]

    # Execute / Assert
    with pytest.raises(ContractError, match="documents"):
        TrustChain.from_bytes(chain_of(*documents))
    assert TrustChain.from_bytes(chain_of(*documents[:MAX_CHAIN])).latest.version == MAX_CHAIN


@pytest.mark.parametrize(
    ("key", "first", "second"),
    [("threshold", "2", "1"), ("version", "2", "3"), ("schema", '"diredi.trust-chain/1"', '"x"')],
)
def test_duplicate_json_keys_are_refused(key: str, first: str, second: str) -> None:
    # Prepare: which value would a verifier and a reader each take?
    text = HISTORY.decode()
    needle = f'"{key}":{first}'
    assert needle in text
    doubled = text.replace(needle, needle + f',"{key}":{second}', 1)

    # Execute / Assert
    with pytest.raises(ContractError, match=f"duplicate key '{key}'"):
        TrustChain.from_bytes(doubled)


def test_a_document_dated_past_the_clock_skew_is_refused_and_one_at_it_is_taken() -> None:
    # Prepare
    at_skew = document(2, [A, B], 2, [A, B], issued_at=NOW + MAX_CLOCK_SKEW)
    beyond = document(2, [A, B], 2, [A, B], issued_at=NOW + MAX_CLOCK_SKEW + timedelta(seconds=1))

    # Execute / Assert
    assert receive(payload(V1, at_skew)) == at_skew
    with pytest.raises(
        ContractError, match="trust document 2 is dated .* in the future of this device's clock"
    ):
        receive(payload(V1, beyond))


def test_a_future_document_older_than_the_device_version_is_not_checked() -> None:
    # Prepare: a v1 from the future is part of the chain, but the device already holds v1
    future_v1 = document(1, [A], 1, [A], issued_at=NOW + timedelta(days=365))

    # Execute / Assert
    assert receive(payload(future_v1, V2)) == V2


def test_check_issued_at_allows_the_skew_and_no_more() -> None:
    # Execute / Assert
    check_issued_at(NOW - timedelta(days=3650), NOW, "x")
    check_issued_at(NOW + MAX_CLOCK_SKEW, NOW, "x")
    with pytest.raises(ContractError, match="the thing is dated"):
        check_issued_at(NOW + MAX_CLOCK_SKEW + timedelta(microseconds=1), NOW, "the thing")


# --- strict JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"a": 1, "a": 1}', "duplicate key 'a'"),
        ('{"a": {"b": 1, "c": 2, "b": 3}}', "duplicate key 'b'"),
        ('[{"a": 1}, {"a": 2, "a": 2}]', "duplicate key 'a'"),
        ('{"a": NaN}', "NaN is not a number JSON allows"),
        ('{"a": Infinity}', "Infinity is not a number JSON allows"),
        ("[-Infinity]", "-Infinity is not a number JSON allows"),
        (b'{"a": "\xff"}', "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),
        ("{", "not JSON"),
    ],
)
def test_strict_json_refuses_what_a_lenient_parser_lets_through(raw: str | bytes, reason: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match=reason):
        strict_json(raw)


def test_strict_json_reads_what_json_reads() -> None:
    # Prepare
    text = '{"a": [1, 2.5, -0, "\\u00e9", null, true], "b": {"a": 1}}'

    # Execute / Assert
    assert strict_json(text) == strict_json(text.encode()) == json.loads(text)


def test_a_duplicate_key_name_is_quoted_escaped_and_short() -> None:
    # Execute
    with pytest.raises(ContractError) as caught:
        strict_json(json.dumps({"\n" + "k" * 200: 1}).replace("}", ', "\\n' + "k" * 200 + '": 2}'))

    # Assert: a sender's key name may not forge or flood a log line
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 100


# --- garbage ---------------------------------------------------------------------------------------


def good() -> dict[str, Any]:
    """HISTORY as a dict to corrupt."""
    parsed: dict[str, Any] = json.loads(HISTORY)
    return parsed


def corrupted(edit: Callable[[dict[str, Any]], object]) -> bytes:
    """HISTORY with `edit` applied to its JSON."""
    chain = good()
    edit(chain)
    return json.dumps(chain).encode()


def second(chain: dict[str, Any]) -> dict[str, Any]:
    """The chain's second document (v2), to corrupt in place."""
    document_2: dict[str, Any] = chain["documents"][1]
    return document_2


GARBAGE: dict[str, bytes | str] = {
    "empty": b"",
    "not-json": b"trust me",
    "not-utf8": b'{"schema": "\xc3\x28"}',
    "bom": b"\xef\xbb\xbf" + HISTORY,
    "truncated": HISTORY[: len(HISTORY) // 2],
    "trailing-data": HISTORY + b"{}",
    "null": b"null",
    "array": b"[]",
    "number": b"42",
    "string": b'"diredi.trust-chain/1"',
    "two-chains": b"[" + HISTORY + b"," + HISTORY + b"]",
    "a-lone-document": V2.model_dump_json(by_alias=True).encode(),
    "deep-nesting": b"[" * 30_000 + b"]" * 30_000,  # within the size limit
    "huge-integer": HISTORY.replace(b'"version":2', b'"version":' + b"9" * 5000, 1),
    "nan-threshold": corrupted(lambda c: second(c).update(threshold=float("nan"))),
    "infinite-version": corrupted(lambda c: second(c).update(version=float("inf"))),
    "duplicate-keys": HISTORY.replace(b'"threshold":2', b'"threshold":2,"threshold":1', 1),
    "other-schema": corrupted(lambda c: c.update(schema="diredi.trust-chain/2")),
    "document-schema": corrupted(lambda c: second(c).update(schema="diredi.trust/0")),
    "no-documents": corrupted(lambda c: c.update(documents=[])),
    "documents-not-a-list": corrupted(lambda c: c.update(documents={"1": c["documents"][0]})),
    "extra-field": corrupted(lambda c: c.update(mirror="http://elsewhere.example")),
    "extra-document-field": corrupted(lambda c: second(c).update(expires="never")),
    "version-zero": corrupted(lambda c: [d.update(version=d["version"] - 1) for d in c["documents"]]),
    "version-too-big": corrupted(lambda c: c.update(documents=[{**second(c), "version": 1 << 31}])),
    "version-a-word": corrupted(lambda c: second(c).update(version="two")),
    "no-keys": corrupted(lambda c: second(c).update(keys={})),
    "keys-a-list": corrupted(lambda c: second(c).update(keys=[A.encoded])),
    "key-not-base64": corrupted(lambda c: second(c)["keys"].update({A.key_id: "not base64!"})),
    "key-not-ascii": corrupted(lambda c: second(c)["keys"].update({A.key_id: "é" * 44})),
    "key-31-bytes": corrupted(
        lambda c: second(c)["keys"].update({A.key_id: base64.b64encode(A.raw[:31]).decode()})
    ),
    "key-id-a-path": corrupted(lambda c: second(c)["keys"].update({"../../etc/passwd": A.encoded})),
    "key-null": corrupted(lambda c: second(c)["keys"].update({A.key_id: None})),
    "seventeen-keys": corrupted(
        lambda c: second(c).update(keys={signer(str(i)).key_id: signer(str(i)).encoded for i in range(17)})
    ),
    "threshold-zero": corrupted(lambda c: second(c).update(threshold=0)),
    "threshold-negative": corrupted(lambda c: second(c).update(threshold=-1)),
    "naive-date": corrupted(lambda c: second(c).update(issued_at="2030-01-01T00:02:00")),
    "not-a-date": corrupted(lambda c: second(c).update(issued_at="yesterday")),
    "date-after-9999": corrupted(lambda c: second(c).update(issued_at=1e300)),
    "far-future-date": corrupted(lambda c: second(c).update(issued_at="9999-12-31T23:59:59-14:00")),
    "lone-surrogate": corrupted(lambda c: second(c).update(schema="\ud800")),
    "signatures-not-a-list": corrupted(lambda c: second(c).update(signatures="all of them")),
    "signature-not-base64": corrupted(lambda c: second(c)["signatures"][0].update(signature="!!!!")),
    "signature-not-ascii": corrupted(lambda c: second(c)["signatures"][0].update(signature="é" * 20)),
    "signature-short": corrupted(lambda c: second(c)["signatures"][0].update(signature="AAAA")),
    "signature-too-long": corrupted(lambda c: second(c)["signatures"][0].update(signature="A" * 129)),
    "signature-key-id-bad": corrupted(lambda c: second(c)["signatures"][0].update(key_id="A" * 16)),
    "signature-extra-field": corrupted(lambda c: second(c)["signatures"][0].update(alg="none")),
    "too-many-signatures": corrupted(lambda c: second(c).update(signatures=second(c)["signatures"] * 17)),
    "no-signatures": corrupted(lambda c: second(c).update(signatures=[])),
    "signed-by-nobody-trusted": payload(V1, document(2, [X], 1, [X])),
}


@pytest.mark.parametrize("raw", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_is_a_contract_error_and_nothing_else(raw: bytes | str) -> None:
    # Execute / Assert: a received chain is parsed and walked; whatever is wrong, a ContractError says so
    with pytest.raises(ContractError):
        receive(raw)


def test_the_garbage_is_garbage_only_where_it_was_corrupted() -> None:
    # Prepare: the corruptions are edits of a chain the device would take
    untouched = corrupted(lambda c: None)

    # Execute / Assert
    assert receive(untouched) == V3
