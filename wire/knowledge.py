"""The RD knowledge report (DESIGN §3 step 4): preference map + head delta, never a private sample."""

import math
from typing import Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wire.arrays import EncodedArray
from wire.common import Envelope, ModelId
from wire.errors import ContractError, describe
from wire.limits import max_payload_bytes
from wire.topics import MessageKind

MAX_CLASSES = 1000


class KnowledgeMetrics(BaseModel):
    """Local metrics of the head delta on a private hold-out (before/after), computed on the device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    holdout_size: int = Field(ge=0)
    holdout_acc_before: float = Field(ge=0.0, le=1.0)
    holdout_acc_after: float = Field(ge=0.0, le=1.0)


class PrivacyStatement(BaseModel):
    """The local DP applied to this report: mechanism, parameters, guarantee and accountant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mechanism: Literal["gaussian"] = "gaussian"
    accountant: Literal["zcdp"] = "zcdp"
    unit: Literal["labelled-sample"] = "labelled-sample"
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    rho: float = Field(gt=0, allow_inf_nan=False)
    sigma_map: float = Field(gt=0, allow_inf_nan=False)
    sigma_delta: float | None = Field(gt=0, allow_inf_nan=False)  # None: the head delta was not sent
    clip_norm: float = Field(gt=0, allow_inf_nan=False)
    # Cumulative (ε, δ) of every report this device has sent on this line, this one included.
    spent_epsilon: float = Field(gt=0, allow_inf_nan=False)


class KnowledgeReport(Envelope):
    """What a device reports after RD: the difference between its user and the manufacturer."""

    schema_: Literal["diredi.knowledge/1"] = Field("diredi.knowledge/1", alias="schema")
    base_model_id: ModelId
    num_classes: int = Field(ge=2, le=MAX_CLASSES)
    feature_dim: int = Field(ge=1, le=65536)
    sample_count: int = Field(ge=1, le=(1 << 31) - 1)  # a 32-bit column; float() of it is exact
    # C×C: row = the model's top-1 on a private sample, column = the user's label. Counts, or
    # noisy counts under DP (which may then be negative or fractional).
    preference_map: EncodedArray
    delta_weight: EncodedArray  # C×D float16
    delta_bias: EncodedArray  # C float16
    metrics: KnowledgeMetrics | None  # None under DP: unnoised private metrics would leak
    privacy: PrivacyStatement | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        c, d = self.num_classes, self.feature_dim
        expected = {
            "preference_map": (self.preference_map, [c, c], ("float32", "int32")),
            "delta_weight": (self.delta_weight, [c, d], ("float16",)),
            "delta_bias": (self.delta_bias, [c], ("float16",)),
        }
        for name, (arr, shape, dtypes) in expected.items():
            if arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
            if arr.dtype not in dtypes:
                raise ValueError(f"{name} has dtype {arr.dtype}, expected one of {dtypes}")
        if self.privacy is not None and self.metrics is not None:
            raise ValueError("a DP report must not carry unnoised metrics")
        counts = self.preference_map.to_numpy().astype(np.float64)
        if self.privacy is None:
            if self.preference_map.dtype != "int32":
                raise ValueError("preference_map must be int32 counts without DP")
            if (counts < 0).any():
                raise ValueError("preference_map has negative counts without DP")
            if not math.isclose(float(counts.sum()), self.sample_count):
                raise ValueError("preference_map counts do not sum to sample_count")
        self.delta_weight.to_numpy()
        self.delta_bias.to_numpy()
        return self

    def counts(self) -> npt.NDArray[np.float64]:
        """The preference map as a float C×C matrix."""
        return self.preference_map.to_numpy().astype(np.float64)

    def head_delta(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(ΔW, Δb) as float32."""
        return (
            self.delta_weight.to_numpy().astype(np.float32),
            self.delta_bias.to_numpy().astype(np.float32),
        )

    def to_bytes(self) -> bytes:
        """The wire payload: compact JSON."""
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "KnowledgeReport":
        """Parse and validate a wire payload; any violation is a ContractError naming the reason."""
        limit = max_payload_bytes(MessageKind.KNOWLEDGE)
        if len(payload) > limit:
            raise ContractError(f"knowledge report of {len(payload)} bytes exceeds {limit}")
        try:
            return cls.model_validate_json(payload)
        except ValidationError as exc:
            raise ContractError(f"invalid knowledge report at {describe(exc)}") from None
