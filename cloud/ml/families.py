"""Model families: what builds a line's teacher and student, and the contract a family must keep.

A family is a factory `(input_shape, num_classes) -> (teacher, student)`: "mlp" and "conv" are built
in, and a manufacturer's own is named by its import path, `package.module:factory`. The student must
be S = h∘f as cloud/ml/nets.py says; `check_family` tells in one line what is wrong when it is not.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cloud.exceptions import FamilyError
from cloud.ml.datasources import MAX_SAMPLE_VALUES
from cloud.ml.nets import EdgeStudent, conv_family, mlp_family

Factory = Callable[[tuple[int, ...], int], tuple[nn.Module, nn.Module]]
BUILT_IN: dict[str, Factory] = {"mlp": mlp_family, "conv": conv_family}
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class NetSpec:
    """What a line's nets are: the family that builds them, the shape of one sample and the classes."""

    family: str = "mlp"
    input_shape: tuple[int, ...] = (64,)
    num_classes: int = 10

    def build(self) -> tuple[nn.Module, EdgeStudent]:
        """A fresh (teacher, student) of this spec, checked against the contract's shapes."""
        factory = resolve_family(self.family)
        try:
            built: object = factory(self.input_shape, self.num_classes)
        except Exception as exc:  # a manufacturer's factory may fail in any way
            raise FamilyError(
                f"family {self.family!r}: the factory fails: {type(exc).__name__}: {exc}"
            ) from None
        if not (isinstance(built, tuple) and len(built) == 2):
            raise FamilyError(
                f"family {self.family!r}: the factory must return (teacher, student), "
                f"not a {type(built).__name__}"
            )
        teacher, student = built
        return teacher, _check_modules(self, teacher, student)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record (what the cloud model's weights and the job store)."""
        return {"family": self.family, "input_shape": list(self.input_shape), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> NetSpec:
        """The spec of `as_dict` or of the first weights format ({side, num_classes, ...}: the MLP pair)."""
        if "family" not in content:
            return cls("mlp", (int(content["side"]) ** 2,), int(content["num_classes"]))
        return cls(
            str(content["family"]), tuple(int(s) for s in content["input_shape"]), int(content["num_classes"])
        )


def default_family(input_shape: tuple[int, ...]) -> str:
    """The built-in family for data of this shape: "conv" for images (C×H×W), "mlp" otherwise."""
    return "conv" if len(input_shape) == 3 else "mlp"


def resolve_family(name: str) -> Factory:
    """The factory a family name stands for; FamilyError if it cannot be found."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if not IMPORT_PATH.match(name):
        raise FamilyError(
            f"family {name!r}: not one of {', '.join(BUILT_IN)} nor an import path package.module:factory"
        )
    module_name, attribute = name.split(":")
    try:
        module = _import(module_name)
    except ImportError as exc:
        raise FamilyError(f"family {name!r}: cannot import {module_name}: {exc}") from None
    except Exception as exc:  # the module's own code failed
        raise FamilyError(
            f"family {name!r}: importing {module_name} fails: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise FamilyError(f"family {name!r}: {module_name} has no callable {attribute}")
    return cast(Factory, factory)


def _import(module_name: str) -> ModuleType:
    """The module, found where Python finds it or else in the working directory (as uvicorn and Celery
    find an app's module): a manufacturer's family may live beside the command that names it."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def _check_modules(spec: NetSpec, teacher: object, student: object) -> EdgeStudent:
    """The student, once the pair keeps the contract's structure and shapes; FamilyError naming the
    first broken rule otherwise."""
    name = spec.family
    for role, module in (("teacher", teacher), ("student", student)):
        if not isinstance(module, nn.Module):
            raise FamilyError(
                f"family {name!r}: the factory must return (teacher, student) nn.Modules; "
                f"its {role} is a {type(module).__name__}"
            )
    head = getattr(student, "head", None)
    if not isinstance(head, nn.Linear):
        raise FamilyError(
            f"family {name!r}: the student's `head` must be one nn.Linear over the features, "
            f"not {type(head).__name__}"
        )
    if not callable(getattr(student, "features", None)):
        raise FamilyError(f"family {name!r}: the student has no `features(x)` method")
    if head.out_features != spec.num_classes:
        raise FamilyError(
            f"family {name!r}: the student's head has {head.out_features} outputs "
            f"for {spec.num_classes} classes"
        )
    if math.prod(spec.input_shape) > MAX_SAMPLE_VALUES:
        raise FamilyError(f"family {name!r}: inputs of {spec.input_shape} are too large for an edge model")
    x = torch.rand(2, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    edge = cast(EdgeStudent, student)
    try:
        with torch.no_grad():
            feats = edge.features(x)
            logits = edge(x)
            teacher_logits = cast(nn.Module, teacher)(x)
    except Exception as exc:  # a user's module may fail in any way on our shapes
        raise FamilyError(
            f"family {name!r}: forward on inputs of {spec.input_shape} fails: {type(exc).__name__}: {exc}"
        ) from None
    for what, out, shape in (
        ("student's features", feats, (2, head.in_features)),
        ("student's logits", logits, (2, spec.num_classes)),
        ("teacher's logits", teacher_logits, (2, spec.num_classes)),
    ):
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise FamilyError(f"family {name!r}: the {what} have shape {got}, the contract needs {shape}")
    with torch.no_grad():
        if not torch.allclose(logits, head(feats), atol=1e-5):
            raise FamilyError(f"family {name!r}: the student's forward(x) is not head(features(x))")
    return edge


def check_family(spec: NetSpec, sample: npt.NDArray[np.float32]) -> None:
    """Check a family against the contract when a line is created: it builds, its forward shapes fit,
    its head is one linear layer over its features, and an untrained student exports fully int8
    (calibrated on `sample`, a few of the line's inputs). FamilyError says in one line what is wrong."""
    from cloud.exceptions import ExportError
    from cloud.ml.export import export_int8

    _, student = spec.build()
    try:
        export_int8(student.eval(), sample, model_id="contract-check-v1", line="contract-check", version=1)
    except ExportError as exc:
        first = str(exc).splitlines()[0]
        raise FamilyError(f"family {spec.family!r}: the student cannot be exported: {first}") from None
