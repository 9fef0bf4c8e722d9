"""The ArtifactManifest (DESIGN §2): what an exported int8 edge model is and how to check it."""

from datetime import datetime
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from wire.arrays import EncodedArray
from wire.common import ModelId, utcnow
from wire.errors import ContractError, describe


def edge_model_id(line: str, version: int) -> str:
    """The id of a line's edge model: what every manifest, the registry and the exporter call it."""
    return f"{line}.v{version}"


class TensorSpec(BaseModel):
    """One input or output tensor of the int8 model: its name in the signature, shape and affine qparams."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    shape: list[int] = Field(min_length=1, max_length=4)
    dtype: Literal["int8"] = "int8"
    scale: float = Field(gt=0, allow_inf_nan=False)
    zero_point: int = Field(ge=-128, le=127)


class ProbeOutput(BaseModel):
    """A probe input and the int8 outputs the artifact must produce for it (self-test). The input is
    float32, or int8 when it is the quantized input itself (large inputs: docs/model-families.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: EncodedArray
    features: EncodedArray
    logits: EncodedArray


OPTIONAL_ADDITIONS = ("output_classes", "pixel_scale")


class ArtifactManifest(BaseModel):
    """Describes one exported edge model; travels inside DesiredModel and next to the artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["diredi.manifest/1"] = Field("diredi.manifest/1", alias="schema")
    model_id: ModelId
    line: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1)
    format: Literal["tflite-int8"] = "tflite-int8"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, le=2**53 - 1)  # an exact JSON number everywhere (RFC 8785)
    signature: str = Field(min_length=1, max_length=64)
    input: TensorSpec
    features: TensorSpec
    logits: TensorSpec
    num_classes: int = Field(ge=2)
    feature_dim: int = Field(ge=1)
    head_weight: EncodedArray  # C×D float32, the float head used for RD
    head_bias: EncodedArray  # C float32
    probes: list[ProbeOutput] = Field(max_length=32)
    created_at: datetime = Field(default_factory=utcnow)
    # The class each output stands for, like a classifier's label file: the model's decision is
    # output_classes[argmax(logits)] and its belief in a class the sum of its outputs' softmax.
    # None is the identity. A relabelled model (docs/learning-loop.md) ships its parent's bytes
    # under a new map, which is exact for any relabelling, merges included.
    output_classes: list[StrictInt] | None = Field(None, max_length=4096)
    # Set on models that take images: the input is C×H×W (channels first) pixel values divided by
    # pixel_scale, so a device can feed the model image files (docs/model-families.md).
    pixel_scale: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("output_classes")
    @classmethod
    def _classes_of_outputs(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        c = info.data.get("num_classes")
        if value is None or c is None:  # num_classes failed on its own
            return value
        if len(value) != c:
            raise ValueError(f"{len(value)} entries for C={c} outputs")
        if not all(0 <= k < c for k in value):
            raise ValueError(f"every entry must be a class in [0, {c})")
        return value

    @model_serializer(mode="wrap")
    def _without_absent_additions(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> Any:
        """The optional fields added after diredi.manifest/1 are left out when they are None, so a
        device that predates them still reads every manifest that does not use them."""
        document = handler(self)
        if isinstance(document, dict):
            for name in OPTIONAL_ADDITIONS:
                if document.get(name, 0) is None:
                    del document[name]
        return document

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.pixel_scale is not None and (len(self.input.shape) != 4 or self.input.shape[1] not in (1, 3)):
            raise ValueError(
                f"pixel_scale is for image inputs B×C×H×W with 1 or 3 channels, not {self.input.shape}"
            )
        c, d = self.num_classes, self.feature_dim
        if self.features.shape[1:] != [d] or self.logits.shape[1:] != [c]:
            raise ValueError(
                f"output shapes {self.features.shape}, {self.logits.shape} do not fit D={d}, C={c}"
            )
        if not self.input.shape[0] == self.features.shape[0] == self.logits.shape[0]:
            raise ValueError("input and outputs have different batch sizes")
        for name, arr, shape in (
            ("head_weight", self.head_weight, [c, d]),
            ("head_bias", self.head_bias, [c]),
        ):
            if arr.dtype != "float32" or arr.shape != shape:
                raise ValueError(f"{name} must be float32 of shape {shape}")
            arr.to_numpy()  # finite
        for i, probe in enumerate(self.probes):
            shapes = (probe.input.shape, probe.features.shape, probe.logits.shape)
            if shapes != (self.input.shape, self.features.shape, self.logits.shape):
                raise ValueError(f"probe {i} does not have the model's tensor shapes")
            if probe.input.dtype not in ("float32", "int8") or (probe.features.dtype, probe.logits.dtype) != (
                "int8",
                "int8",
            ):
                raise ValueError(f"probe {i} must hold a float32 or int8 input and int8 outputs")
        return self

    def class_of_output(self) -> npt.NDArray[np.int64]:
        """The class each output stands for (the identity unless the manifest says otherwise)."""
        if self.output_classes is None:
            return np.arange(self.num_classes, dtype=np.int64)
        return np.asarray(self.output_classes, dtype=np.int64)

    def to_json(self) -> str:
        """The manifest as JSON, as stored next to the artifact."""
        return self.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ArtifactManifest":
        """Parse and validate a manifest; a violation is a ContractError naming the field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ContractError(f"invalid manifest at {describe(exc)}") from None
