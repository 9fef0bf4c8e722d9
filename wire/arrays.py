"""Numeric arrays on the wire: dtype, shape and little-endian bytes in base64, checked on decode."""

import base64
import binascii
import math
from typing import Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from wire.errors import ContractError

WireDType = Literal["float16", "float32", "int8", "int32", "uint8"]
MAX_ELEMENTS = 1 << 20


class EncodedArray(BaseModel):
    """A dense array: `data` is base64 of the little-endian C-order bytes of `shape` × `dtype`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: WireDType
    shape: list[int] = Field(max_length=4)
    data: str

    @model_validator(mode="after")
    def _check_size(self) -> Self:
        if any(d < 0 for d in self.shape):
            raise ValueError("shape has a negative dimension")
        count = math.prod(self.shape)  # Python ints: no overflow, whatever the sender claims
        if count > MAX_ELEMENTS:
            raise ValueError(f"array of {count} elements exceeds {MAX_ELEMENTS}")
        expected = count * np.dtype(self.dtype).itemsize
        # The base64 length follows from the byte count; checking it first avoids decoding junk.
        if len(self.data) != 4 * ((expected + 2) // 3):
            raise ValueError(f"data does not hold {expected} bytes for shape {self.shape} of {self.dtype}")
        try:
            decoded = len(base64.b64decode(self.data, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"data is not base64: {exc}") from None
        if decoded != expected:
            raise ValueError(f"data holds {decoded} bytes, {self.dtype}{self.shape} needs {expected}")
        return self

    @classmethod
    def from_numpy(cls, array: npt.ArrayLike, dtype: WireDType) -> "EncodedArray":
        """Encode `array` after casting it to `dtype`."""
        arr = np.asarray(array).astype(np.dtype(dtype).newbyteorder("<"), order="C")
        return cls(dtype=dtype, shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode("ascii"))

    def to_numpy(self, *, finite: bool = True) -> npt.NDArray[np.generic]:
        """Decode to a new array; with `finite`, NaN or Inf is a ContractError."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ContractError(f"array data is not base64: {exc}") from None
        arr = np.frombuffer(raw, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape)
        if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ContractError("array holds NaN or Inf")
        return arr.astype(arr.dtype.newbyteorder("="))
