"""The ArtifactManifest (DESIGN §2): what an exported int8 edge model is and how to check it."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wire.arrays import EncodedArray
from wire.common import ModelId, utcnow
from wire.errors import ContractError

MANIFEST_SCHEMA = "diredi.manifest/1"


class TensorSpec(BaseModel):
    """One input or output tensor of the int8 model: its name in the signature, shape and affine qparams."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    shape: list[int] = Field(min_length=1, max_length=4)
    dtype: Literal["int8"] = "int8"
    scale: float = Field(gt=0, allow_inf_nan=False)
    zero_point: int = Field(ge=-128, le=127)


class ProbeOutput(BaseModel):
    """A probe input (float) and the int8 outputs the artifact must produce for it (self-test)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: EncodedArray
    features: EncodedArray
    logits: EncodedArray


class ArtifactManifest(BaseModel):
    """Describes one exported edge model; travels inside DesiredModel and next to the artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_: Literal["diredi.manifest/1"] = Field("diredi.manifest/1", alias="schema")
    model_id: ModelId
    line: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1)
    format: Literal["tflite-int8"] = "tflite-int8"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0)
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

    def to_json(self) -> str:
        """The manifest as JSON, as stored next to the artifact."""
        return self.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ArtifactManifest":
        """Parse and validate a manifest; a violation is a ContractError naming the field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise ContractError(f"invalid manifest at {where}: {first['msg']}") from None
