"""wire.EncodedArray: lossless round trips per dtype, and garbage refused on construction or decode."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from wire import ContractError, EncodedArray
from wire.arrays import MAX_ELEMENTS, WireDType


def sample_array(dtype: WireDType, shape: tuple[int, ...] = (3, 5)) -> npt.NDArray[Any]:
    """Values spanning the dtype's range (extremes included), in a fixed pseudo-random order."""
    rng = np.random.default_rng(7)
    kind = np.dtype(dtype)
    if kind.kind == "f":
        finfo = np.finfo(kind)
        values = rng.normal(0.0, 100.0, size=shape).astype(kind)
        values.flat[0], values.flat[1], values.flat[2] = finfo.max, finfo.min, finfo.tiny
        return values
    iinfo = np.iinfo(kind)
    values = rng.integers(iinfo.min, iinfo.max, size=shape, endpoint=True).astype(kind)
    values.flat[0], values.flat[1] = iinfo.max, iinfo.min
    return values


def b64_of(n_bytes: int) -> str:
    """Valid base64 of `n_bytes` zero bytes."""
    return base64.b64encode(bytes(n_bytes)).decode("ascii")


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "int32", "uint8"])
def test_round_trip_preserves_dtype_shape_and_values(dtype: WireDType) -> None:
    # Prepare
    original = sample_array(dtype)

    # Execute
    decoded = EncodedArray.model_validate_json(EncodedArray.from_numpy(original, dtype).model_dump_json())
    restored = decoded.to_numpy()

    # Assert
    assert restored.dtype == np.dtype(dtype)
    assert restored.shape == original.shape
    assert restored.tobytes() == original.tobytes()
    assert restored.flags.writeable  # "a new array", not a read-only view of the decoded bytes


@pytest.mark.parametrize("shape", [(0,), (4,), (2, 3), (1, 2, 3), (2, 1, 3, 2), (0, 7)])
def test_round_trip_for_every_rank_up_to_four(shape: tuple[int, ...]) -> None:
    # Prepare
    original = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)

    # Execute
    restored = EncodedArray.from_numpy(original, "int32").to_numpy()

    # Assert
    assert restored.shape == shape
    np.testing.assert_array_equal(restored, original)


def test_data_is_little_endian_base64() -> None:
    # Prepare
    values = np.array([1, 256], dtype=np.int32)

    # Execute
    encoded = EncodedArray.from_numpy(values, "int32")

    # Assert
    assert base64.b64decode(encoded.data) == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_big_endian_input_is_stored_little_endian() -> None:
    # Prepare
    values = np.array([1.5, -2.0], dtype=">f4")

    # Execute
    encoded = EncodedArray.from_numpy(values, "float32")

    # Assert
    assert base64.b64decode(encoded.data) == np.array([1.5, -2.0], dtype="<f4").tobytes()
    np.testing.assert_array_equal(encoded.to_numpy(), [1.5, -2.0])


def test_round_trip_keeps_a_zero_dimensional_shape() -> None:
    # Prepare
    scalar = np.array(3.0, dtype=np.float32)

    # Execute
    encoded = EncodedArray.from_numpy(scalar, "float32")

    # Assert
    assert encoded.shape == []
    assert encoded.to_numpy().shape == ()


@pytest.mark.parametrize(
    "data",
    [
        "!!!!",  # not in the base64 alphabet
        "AA=A",  # padding in the middle
        "AA==AAAA",  # data after the padding (length right for 6 bytes)
        "AAA AAAA",  # whitespace
    ],
)
def test_invalid_base64_is_refused_on_construction(data: str) -> None:
    # Prepare
    shape = [3] if len(data) == 4 else [6]

    # Execute / Assert: the array is never built, so it can never be decoded later
    with pytest.raises(ValidationError, match="not base64"):
        EncodedArray(dtype="uint8", shape=shape, data=data)


@pytest.mark.parametrize(
    ("dtype", "shape", "n_bytes"),
    [
        ("float32", [4], 12),  # one element short
        ("float32", [4], 20),  # one element too many
        ("int32", [2, 2], 4),
        ("float16", [3], 0),
        ("uint8", [], 0),  # a scalar holds one element
        ("int8", [0], 3),  # an empty array holds no data
    ],
)
def test_data_length_not_matching_shape_and_dtype_is_refused(
    dtype: WireDType, shape: list[int], n_bytes: int
) -> None:
    # Prepare
    data = b64_of(n_bytes)

    # Execute / Assert
    with pytest.raises(ValidationError, match="does not hold"):
        EncodedArray(dtype=dtype, shape=shape, data=data)


def test_base64_decoding_to_too_few_bytes_is_a_contract_error() -> None:
    # Prepare: 4 base64 characters, as for 2 bytes, but the padding makes them decode to 1 byte.
    data = "AA=="

    # Execute / Assert
    with pytest.raises((ValidationError, ContractError)):
        EncodedArray(dtype="float16", shape=[1], data=data).to_numpy()


@pytest.mark.parametrize("shape", [[-1], [2, -3], [-2, -2]])
def test_negative_dimension_is_refused(shape: list[int]) -> None:
    # Prepare
    data = b64_of(abs(int(np.prod(shape))))

    # Execute / Assert
    with pytest.raises(ValidationError, match="negative dimension"):
        EncodedArray(dtype="uint8", shape=shape, data=data)


def test_more_than_four_dimensions_is_refused() -> None:
    # Prepare
    shape = [1, 1, 1, 1, 1]

    # Execute / Assert
    with pytest.raises(ValidationError, match="at most 4"):
        EncodedArray(dtype="uint8", shape=shape, data=b64_of(1))


def test_too_many_elements_is_refused_before_the_data_is_looked_at() -> None:
    # Prepare
    shape = [MAX_ELEMENTS + 1]

    # Execute / Assert
    with pytest.raises(ValidationError, match="exceeds"):
        EncodedArray(dtype="uint8", shape=shape, data="")


def test_exactly_max_elements_is_accepted() -> None:
    # Prepare
    data = b64_of(MAX_ELEMENTS)

    # Execute
    array = EncodedArray(dtype="uint8", shape=[1024, 1024], data=data)

    # Assert
    assert array.to_numpy().size == MAX_ELEMENTS


def test_from_numpy_refuses_too_many_elements() -> None:
    # Prepare
    big = np.zeros(MAX_ELEMENTS + 1, dtype=np.uint8)

    # Execute / Assert
    with pytest.raises(ValidationError, match="exceeds"):
        EncodedArray.from_numpy(big, "uint8")


def test_element_count_overflowing_int64_is_refused() -> None:
    # Prepare
    shape = [2**32, 2**32]

    # Execute / Assert
    with pytest.raises(ValidationError):
        EncodedArray(dtype="uint8", shape=shape, data="")


def test_dimension_beyond_int64_is_a_validation_error() -> None:
    # Prepare
    shape = [2**64]

    # Execute / Assert
    with pytest.raises(ValidationError):
        EncodedArray(dtype="uint8", shape=shape, data="")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_a_contract_error(dtype: WireDType, bad: float) -> None:
    # Prepare
    array = EncodedArray.from_numpy(np.array([[1.0, 2.0], [bad, 4.0]]), dtype)

    # Execute / Assert
    with pytest.raises(ContractError, match="NaN or Inf"):
        array.to_numpy()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_non_finite_values_are_returned_when_finite_is_off(dtype: WireDType) -> None:
    # Prepare
    array = EncodedArray.from_numpy(np.array([np.nan, np.inf, -np.inf, 1.0]), dtype)

    # Execute
    values = array.to_numpy(finite=False)

    # Assert
    assert np.isnan(values[0])
    assert values[1] == np.inf
    assert values[2] == -np.inf
    assert values[3] == 1.0


@pytest.mark.parametrize(
    "doc",
    [
        {"dtype": "float64", "shape": [1], "data": b64_of(8)},
        {"dtype": "int8", "shape": [1], "data": b64_of(1), "extra": 1},
        {"dtype": "int8", "shape": [1]},
        {"dtype": "int8", "shape": [1.5], "data": b64_of(1)},
        {"dtype": "int8", "shape": "1", "data": b64_of(1)},
    ],
    ids=["unknown-dtype", "extra-field", "missing-data", "fractional-dim", "shape-not-a-list"],
)
def test_malformed_documents_are_refused(doc: dict[str, Any]) -> None:
    # Execute / Assert
    with pytest.raises(ValidationError):
        EncodedArray.model_validate(doc)
