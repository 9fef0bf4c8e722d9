"""Scenario files (DESIGN §3): the data split and the users of a simulation, validated on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cloud.exceptions import ScenarioError
from cloud.ml.datasources import DataSource, parse_data_option, resolve_paths
from wire.errors import describe

MAX_SCENARIO_BYTES = 1024 * 1024


class PresumedSplit(BaseModel):
    """How the manufacturer's (presumed) pool is split into train, validation and test."""

    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(gt=0.0, lt=1.0, strict=True)
    val_fraction: float = Field(default=0.15, gt=0.0, lt=1.0, strict=True)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> Self:
        if self.test_fraction + self.val_fraction > 0.8:
            raise ValueError("test_fraction + val_fraction must leave at least 20% for training")
        return self


class UserSpec(BaseModel):
    """One user: their preference (label_map), input noise, private pool sizes and device count."""

    model_config = ConfigDict(extra="forbid")

    # A device id's pattern, shortened: the simulation names the user's devices "<id>-d<k>".
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{2,55}$")
    label_map: dict[int, int] = Field(default_factory=dict)
    # strict: a JSON string or boolean is a mistake in the file, not a number to coerce
    noise_std: float = Field(default=0.0, ge=0.0, le=100.0, strict=True)
    private_train: int = Field(ge=1, strict=True)
    private_test: int = Field(ge=1, strict=True)
    devices: int = Field(default=1, ge=1, le=64, strict=True)

    @field_validator("label_map", mode="before")
    @classmethod
    def _keys_are_class_strings(cls, value: object) -> object:
        if isinstance(value, dict):
            for key, target in value.items():
                # canonical class numbers only: "03" and "3" would silently collapse into one entry
                if not (isinstance(key, str) and key.isdigit() and str(int(key)) == key) or isinstance(
                    target, bool
                ):
                    raise ValueError(f'entry {key!r}: {target!r} must map a class like "3" to a class like 8')
                if not isinstance(target, int):
                    raise ValueError(f"entry {key!r} maps to {target!r}, not a class number")
        return value


class Scenario(BaseModel):
    """A whole scenario file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    # a built-in name ("digits", "mnist-5k"), {"npz": path} or {"folder": path, ...}: cloud/ml/datasources.py
    dataset: DataSource
    # the model family (cloud/ml/families.py): "mlp", "conv" or "package.module:factory"; None: the
    # built-in family for the data's shape
    family: str | None = Field(None, min_length=1, max_length=200)
    seed: int = Field(ge=0, le=2**32 - 1, strict=True)
    presumed: PresumedSplit
    # A line file is a scenario without users; a simulation needs at least one.
    users: list[UserSpec] = Field(default_factory=list, max_length=64)

    @field_validator("dataset", mode="wrap")
    @classmethod
    def _source_error_without_its_tag(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        """A bad source's error as `dataset.<field>: reason`, without the kind of source pydantic
        puts in its path (`dataset.npz.npz`)."""
        try:
            return handler(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"][1:])
            reason = str(first["msg"]).removeprefix("Value error, ")
            detail = f"{where}: {reason}" if where else reason
            raise PydanticCustomError("data_source", "{detail}", {"detail": detail}) from None

    @field_validator("users")
    @classmethod
    def _unique_users(cls, users: list[UserSpec]) -> list[UserSpec]:
        ids = [u.id for u in users]
        if len(set(ids)) != len(ids):
            raise ValueError(f"user ids must be unique, got {ids}")
        return users

    def check_against(self, num_classes: int, num_samples: int) -> None:
        """Check class numbers and pool sizes against the dataset; raise ScenarioError naming the field."""
        for i, user in enumerate(self.users):
            for src, dst in user.label_map.items():
                if not (0 <= src < num_classes and 0 <= dst < num_classes):
                    raise ScenarioError(
                        f"users.{i}.label_map: {src} -> {dst} is outside the dataset's classes "
                        f"0..{num_classes - 1}"
                    )
        private = sum(u.devices * u.private_train + u.private_test for u in self.users)
        if num_samples - private < num_samples // 4:
            raise ScenarioError(
                f"users: private pools take {private} of {num_samples} samples; "
                f"at least {num_samples // 4} must stay presumed"
            )


def parse_scenario(text: str | bytes, source: str = "scenario") -> Scenario:
    """Validate scenario JSON; one ScenarioError naming the first bad field."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{source}: not valid JSON: {exc}") from None
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {describe(exc)}") from None


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; a data file it names by a relative path is found beside it."""
    try:
        size = path.stat().st_size
        if size > MAX_SCENARIO_BYTES:
            raise ScenarioError(f"{path}: {size} bytes is larger than {MAX_SCENARIO_BYTES}")
        text = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    scenario = parse_scenario(text, str(path))
    return scenario.model_copy(update={"dataset": resolve_paths(scenario.dataset, path.parent)})


def load_simulation(path: Path) -> Scenario:
    """A scenario file to simulate: `load_scenario`, and at least one user."""
    scenario = load_scenario(path)
    if not scenario.users:
        raise ScenarioError(f"{path}: users: a simulation needs at least one user")
    return scenario


def line_scenario(
    name: str,
    path: Path | None,
    *,
    data: str | None = None,
    family: str | None = None,
    image_size: str | None = None,
    channels: int | None = None,
    seed: int = 0,
) -> Scenario:
    """What `diredi line create` trains on: a line or scenario file, with the data source and family
    options taking precedence over it, or those options alone (the seed and a default split then);
    ScenarioError naming the option or field."""
    if path is None and data is None:
        raise ScenarioError(
            "name the data: --data (digits, mnist-5k, an .npz or an image folder) or --scenario FILE"
        )
    scenario = (
        load_scenario(path)
        if path is not None
        else Scenario(name=name, dataset="digits", seed=seed, presumed=PresumedSplit(test_fraction=0.2))
    )
    changes: dict[str, object] = {}
    if data is not None:
        changes["dataset"] = parse_data_option(data, image_size, channels)
    elif image_size is not None or channels is not None:
        raise ScenarioError("--image-size and --channels go with --data naming an image folder")
    if family is not None:
        changes["family"] = family
    return scenario.model_copy(update=changes)
