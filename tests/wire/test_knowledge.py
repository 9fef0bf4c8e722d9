"""wire.KnowledgeReport: a valid report round-trips; every kind of garbage is a ContractError."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import (
    MAX_PAYLOAD_BYTES,
    ContractError,
    EncodedArray,
    KnowledgeMetrics,
    KnowledgeReport,
    MessageKind,
    PrivacyStatement,
)

C, D = 10, 64
KNOWLEDGE_LIMIT = MAX_PAYLOAD_BYTES[MessageKind.KNOWLEDGE]

Doc = dict[str, Any]


def make_counts(sample_count: int = 60) -> npt.NDArray[np.int32]:
    """A C×C preference map with `sample_count` samples: mostly on the diagonal, a 3→8 preference."""
    counts = np.zeros((C, C), dtype=np.int32)
    counts[3, 8] = 6
    np.fill_diagonal(counts, 1)
    counts[0, 0] += sample_count - int(counts.sum())
    return counts


def make_report(**overrides: Any) -> KnowledgeReport:
    """A valid report built from numpy arrays (C=10, D=64, float16 Δ, int32 counts); fields overridable."""
    rng = np.random.default_rng(0)
    counts = make_counts()
    fields: Doc = {
        "device_id": "dev-1",
        "base_model_id": "base.v1",
        "num_classes": C,
        "feature_dim": D,
        "sample_count": int(counts.sum()),
        "preference_map": EncodedArray.from_numpy(counts, "int32"),
        "delta_weight": EncodedArray.from_numpy(rng.normal(0.0, 0.05, size=(C, D)), "float16"),
        "delta_bias": EncodedArray.from_numpy(rng.normal(0.0, 0.05, size=C), "float16"),
        "metrics": KnowledgeMetrics(holdout_size=12, holdout_acc_before=0.5, holdout_acc_after=0.75),
    }
    fields.update(overrides)
    if fields.get("privacy") is not None and "metrics" not in overrides:
        fields["metrics"] = None  # a DP report carries no unnoised metrics
    return KnowledgeReport.model_validate(fields)


def report_doc() -> Doc:
    """The JSON document of a valid report, as a dict to corrupt."""
    doc: Doc = json.loads(make_report().to_bytes())
    return doc


def payload_of(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def array_doc(array: npt.ArrayLike, dtype: Any) -> Doc:
    """The JSON form of an EncodedArray."""
    doc: Doc = EncodedArray.from_numpy(array, dtype).model_dump()
    return doc


def test_round_trip_through_bytes() -> None:
    # Prepare
    report = make_report()

    # Execute
    parsed = KnowledgeReport.from_bytes(report.to_bytes())

    # Assert
    assert parsed == report
    np.testing.assert_array_equal(parsed.counts(), make_counts())
    w, b = parsed.head_delta()
    assert w.shape == (C, D)
    assert b.shape == (C,)
    assert w.dtype == b.dtype == np.float32


def test_wire_form_uses_the_schema_alias() -> None:
    # Prepare
    report = make_report()

    # Execute
    doc = json.loads(report.to_bytes())

    # Assert
    assert doc["schema"] == "diredi.knowledge/1"
    assert "schema_" not in doc


def test_round_trip_with_a_privacy_statement_and_noisy_counts() -> None:
    # Prepare: under DP the map is noisy: negative, fractional, not summing to sample_count.
    noisy = make_counts().astype(np.float32) + np.float32(0.25)
    noisy[1, 2] = -1.5
    privacy = PrivacyStatement(
        epsilon=4.0, delta=1e-5, rho=0.3, sigma_map=1.3, sigma_delta=None, clip_norm=1.0, spent_epsilon=4.0
    )
    report = make_report(preference_map=EncodedArray.from_numpy(noisy, "float32"), privacy=privacy)

    # Execute
    parsed = KnowledgeReport.from_bytes(report.to_bytes())

    # Assert
    assert parsed == report
    assert parsed.privacy == privacy
    np.testing.assert_array_equal(parsed.counts(), noisy)


def test_payload_exactly_at_the_limit_is_accepted() -> None:
    # Prepare: trailing whitespace is valid JSON, so pad a valid report to the limit.
    report = make_report()
    payload = report.to_bytes()
    padded = payload + b" " * (KNOWLEDGE_LIMIT - len(payload))

    # Execute
    parsed = KnowledgeReport.from_bytes(padded)

    # Assert
    assert len(padded) == KNOWLEDGE_LIMIT
    assert parsed == report


def test_payload_over_the_limit_is_refused() -> None:
    # Prepare
    payload = make_report().to_bytes()
    padded = payload + b" " * (KNOWLEDGE_LIMIT + 1 - len(payload))

    # Execute / Assert
    assert KNOWLEDGE_LIMIT == 256 * 1024
    with pytest.raises(ContractError, match="exceeds"):
        KnowledgeReport.from_bytes(padded)


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"{", b'{"schema": "diredi.knowledge/1"', b"\xff\xfe\x00", b"NaN"],
    ids=["empty", "text", "open-brace", "truncated", "binary", "nan"],
)
def test_not_json_is_refused(payload: bytes) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match="invalid knowledge report"):
        KnowledgeReport.from_bytes(payload)


def test_truncated_report_is_refused() -> None:
    # Prepare
    payload = make_report().to_bytes()

    # Execute / Assert
    with pytest.raises(ContractError):
        KnowledgeReport.from_bytes(payload[: len(payload) // 2])


@pytest.mark.parametrize(
    "doc", [[], "report", 42, None, True], ids=["list", "string", "number", "null", "bool"]
)
def test_top_level_that_is_not_an_object_is_refused(doc: Any) -> None:
    # Execute / Assert
    with pytest.raises(ContractError):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_classes", "ten"),
        ("num_classes", 10.5),
        ("feature_dim", [64]),
        ("sample_count", None),
        ("device_id", 17),
        ("metrics", [12, 0.5, 0.75]),
        ("preference_map", "AAAA"),
        ("msg_id", "not-a-uuid"),
        ("sent_at", "yesterday"),
    ],
)
def test_wrong_json_types_are_refused_naming_the_field(field: str, value: Any) -> None:
    # Prepare
    doc = report_doc()
    doc[field] = value

    # Execute / Assert
    with pytest.raises(ContractError, match=f"at {field}"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize("schema", ["diredi.knowledge/2", "diredi.manifest/1", "", "DIREDI.KNOWLEDGE/1"])
def test_unknown_schema_is_refused(schema: str) -> None:
    # Prepare
    doc = report_doc()
    doc["schema"] = schema

    # Execute / Assert
    with pytest.raises(ContractError, match="at schema"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    "field",
    [
        "device_id",
        "base_model_id",
        "num_classes",
        "feature_dim",
        "sample_count",
        "preference_map",
        "delta_weight",
        "delta_bias",
        "metrics",
    ],
)
def test_missing_field_is_refused_naming_it(field: str) -> None:
    # Prepare
    doc = report_doc()
    del doc[field]

    # Execute / Assert
    with pytest.raises(ContractError, match=f"at {field}: Field required"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    "add_extra",
    [
        lambda doc: doc.update(samples=[[0.0] * D]),
        lambda doc: doc["metrics"].update(holdout_inputs=[]),
        lambda doc: doc["delta_weight"].update(raw="AAAA"),
    ],
    ids=["top-level", "in-metrics", "in-array"],
)
def test_extra_field_is_refused(add_extra: Callable[[Doc], None]) -> None:
    # Prepare
    doc = report_doc()
    add_extra(doc)

    # Execute / Assert
    with pytest.raises(ContractError, match="Extra inputs are not permitted"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    "device_id",
    ["Dev-1", "d1", "dev+1", "dev#1", "+", "#", "dev/1", "-dev", "dev 1", "", "d" * 64, "dev-1\n"],
)
def test_bad_device_id_is_refused(device_id: str) -> None:
    # Prepare
    doc = report_doc()
    doc["device_id"] = device_id

    # Execute / Assert
    with pytest.raises(ContractError, match="at device_id"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    ("field", "array"),
    [
        ("preference_map", np.zeros((C, C + 1), np.int32)),
        ("preference_map", np.zeros(C * C, np.int32)),
        ("delta_weight", np.zeros((C, D - 1), np.float16)),
        ("delta_weight", np.zeros((D, C), np.float16)),
        ("delta_bias", np.zeros(C + 1, np.float16)),
        ("delta_bias", np.zeros((C, 1), np.float16)),
    ],
)
def test_wrong_shape_is_refused(field: str, array: npt.NDArray[Any]) -> None:
    # Prepare
    doc = report_doc()
    doc[field] = array_doc(array, array.dtype.name)

    # Execute / Assert
    with pytest.raises(ContractError, match=f"{field} has shape"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    ("field", "shape", "dtype"),
    [
        ("delta_weight", (C, D), "float32"),
        ("delta_bias", (C,), "float32"),
        ("delta_weight", (C, D), "int8"),
        ("preference_map", (C, C), "uint8"),
        ("preference_map", (C, C), "float16"),
    ],
)
def test_wrong_dtype_is_refused(field: str, shape: tuple[int, ...], dtype: str) -> None:
    # Prepare
    doc = report_doc()
    doc[field] = array_doc(np.zeros(shape), dtype)

    # Execute / Assert
    with pytest.raises(ContractError, match=f"{field} has dtype"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize("field", ["delta_weight", "delta_bias"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_delta_is_refused(field: str, bad: float) -> None:
    # Prepare
    doc = report_doc()
    values = EncodedArray.model_validate(doc[field]).to_numpy().astype(np.float32)
    values.flat[values.size // 2] = bad
    doc[field] = array_doc(values, "float16")

    # Execute / Assert
    with pytest.raises(ContractError, match="NaN or Inf"):
        KnowledgeReport.from_bytes(payload_of(doc))


def test_non_finite_noisy_map_is_refused_even_under_privacy() -> None:
    # Prepare
    noisy = make_counts().astype(np.float32)
    noisy[2, 2] = np.nan
    privacy = PrivacyStatement(
        epsilon=4.0, delta=1e-5, rho=0.3, sigma_map=1.3, sigma_delta=None, clip_norm=1.0, spent_epsilon=4.0
    )
    doc = json.loads(make_report(privacy=privacy).to_bytes())
    doc["preference_map"] = array_doc(noisy, "float32")

    # Execute / Assert
    with pytest.raises(ContractError, match="NaN or Inf"):
        KnowledgeReport.from_bytes(payload_of(doc))


def test_negative_counts_without_privacy_are_refused() -> None:
    # Prepare: keep the sum right so that only the sign is wrong.
    counts = make_counts()
    counts[1, 1] -= 2
    counts[2, 2] += 2
    doc = report_doc()
    doc["preference_map"] = array_doc(counts, "int32")

    # Execute / Assert
    assert counts.sum() == doc["sample_count"]
    with pytest.raises(ContractError, match="negative counts"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize("offset", [-1, 1, 1000])
def test_counts_not_summing_to_sample_count_are_refused(offset: int) -> None:
    # Prepare
    doc = report_doc()
    doc["sample_count"] += offset

    # Execute / Assert
    with pytest.raises(ContractError, match="do not sum to sample_count"):
        KnowledgeReport.from_bytes(payload_of(doc))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_classes", 1),
        ("num_classes", 1001),
        ("feature_dim", 0),
        ("sample_count", 0),
        ("base_model_id", ""),
        ("base_model_id", "-leading-dash"),
    ],
)
def test_out_of_range_scalars_are_refused(field: str, value: Any) -> None:
    # Prepare
    doc = report_doc()
    doc[field] = value

    # Execute / Assert
    with pytest.raises(ContractError, match=f"at {field}"):
        KnowledgeReport.from_bytes(payload_of(doc))


def test_huge_array_dimension_is_a_contract_error() -> None:
    # Prepare
    doc = report_doc()
    doc["preference_map"]["shape"] = [2**64, C]

    # Execute / Assert
    with pytest.raises(ContractError):
        KnowledgeReport.from_bytes(payload_of(doc))


def assert_report_or_contract_error(payload: bytes) -> None:
    """The property of from_bytes: a KnowledgeReport or a ContractError, never any other exception."""
    try:
        result = KnowledgeReport.from_bytes(payload)
    except ContractError:
        return
    assert isinstance(result, KnowledgeReport)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
report_keys = st.sampled_from(sorted(report_doc())) | st.text(max_size=12)


@settings(deadline=None)
@given(payload=st.binary(max_size=512))
def test_any_bytes_give_a_report_or_a_contract_error(payload: bytes) -> None:
    assert_report_or_contract_error(payload)


@settings(deadline=None)
@given(text=st.text(max_size=512))
def test_any_text_gives_a_report_or_a_contract_error(text: str) -> None:
    assert_report_or_contract_error(text.encode())


@settings(deadline=None)
@given(doc=st.dictionaries(report_keys, json_values, max_size=12))
def test_any_json_object_gives_a_report_or_a_contract_error(doc: Doc) -> None:
    assert_report_or_contract_error(payload_of(doc))


@settings(deadline=None)
@given(field=st.sampled_from(sorted(report_doc())), value=json_values)
def test_any_json_value_in_a_valid_report_gives_a_report_or_a_contract_error(field: str, value: Any) -> None:
    # Prepare
    doc = report_doc()
    doc[field] = value

    # Execute / Assert
    assert_report_or_contract_error(payload_of(doc))


def test_a_dp_report_with_unnoised_metrics_is_refused() -> None:
    # Prepare
    privacy = PrivacyStatement(
        epsilon=4.0, delta=1e-5, rho=0.3, sigma_map=1.3, sigma_delta=None, clip_norm=1.0, spent_epsilon=4.0
    )
    doc = json.loads(make_report(privacy=privacy).to_bytes())
    doc["metrics"] = {"holdout_size": 12, "holdout_acc_before": 0.5, "holdout_acc_after": 0.75}

    # Execute / Assert
    with pytest.raises(ContractError, match="unnoised metrics"):
        KnowledgeReport.from_bytes(payload_of(doc))
