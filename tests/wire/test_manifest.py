"""wire.ArtifactManifest.from_json: the real manifest round-trips; garbage is refused naming the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from wire import ArtifactManifest, ContractError
from wire.manifest import OPTIONAL_ADDITIONS

if TYPE_CHECKING:
    from cloud.ml.line import EdgeLine

Doc = dict[str, Any]


def manifest_doc(line: EdgeLine) -> Doc:
    """The JSON document of the fixture's real manifest, as a dict to corrupt."""
    doc: Doc = json.loads(line.artifact.manifest.to_json())
    return doc


def too_many_probes(doc: Doc) -> None:
    doc["probes"] = [doc["probes"][0]] * 33


def drop(field: str) -> Callable[[Doc], None]:
    return lambda doc: doc.pop(field)


def put(field: str, value: Any) -> Callable[[Doc], None]:
    return lambda doc: doc.update({field: value})


def put_in(parent: str, field: str, value: Any) -> Callable[[Doc], None]:
    return lambda doc: doc[parent].update({field: value})


def test_real_manifest_round_trips(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest

    # Execute
    parsed = ArtifactManifest.from_json(manifest.to_json())

    # Assert
    assert parsed == manifest
    assert json.loads(manifest.to_json())["schema"] == "diredi.manifest/1"


def test_real_manifest_accepts_bytes(base_line: EdgeLine) -> None:
    # Prepare
    text = base_line.artifact.manifest.to_json()

    # Execute
    parsed = ArtifactManifest.from_json(text.encode())

    # Assert
    assert parsed == base_line.artifact.manifest


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [
        (put("sha256", "0" * 63), "sha256"),
        (put("sha256", "A" * 64), "sha256"),
        (put("sha256", "g" * 64), "sha256"),
        (put("sha256", ""), "sha256"),
        (put("size", 0), "size"),
        (put("size", -1), "size"),
        (put("size", "big"), "size"),
        (drop("input"), "input"),
        (drop("logits"), "logits"),
        (drop("sha256"), "sha256"),
        (drop("head_weight"), "head_weight"),
        (too_many_probes, "probes"),
        (put("schema", "diredi.manifest/2"), "schema"),
        (put("format", "onnx"), "format"),
        (put("version", 0), "version"),
        (put("model_id", "bad id"), "model_id"),
        (put("num_classes", 1), "num_classes"),
        (put("unexpected", True), "unexpected"),
        (put_in("input", "scale", 0.0), "input.scale"),
        (put_in("input", "zero_point", 128), "input.zero_point"),
        (put_in("features", "dtype", "float32"), "features.dtype"),
        (put_in("logits", "shape", []), "logits.shape"),
        (put_in("logits", "shape", [1, 1, 1, 1, 10]), "logits.shape"),
        (put("output_classes", [0] * 9), "output_classes"),
        (put("output_classes", [0] * 9 + [10]), "output_classes"),
        (put("output_classes", [0] * 9 + [-1]), "output_classes"),
        (put("output_classes", [0] * 9 + [True]), "output_classes"),
        (put("output_classes", [0] * 9 + ["1"]), "output_classes"),
        (put("output_classes", "0123456789"), "output_classes"),
    ],
    ids=[
        "sha-short",
        "sha-uppercase",
        "sha-not-hex",
        "sha-empty",
        "size-zero",
        "size-negative",
        "size-not-int",
        "missing-input",
        "missing-logits",
        "missing-sha",
        "missing-head",
        "33-probes",
        "schema",
        "format",
        "version-zero",
        "model-id",
        "one-class",
        "extra-field",
        "zero-scale",
        "zero-point-range",
        "float-tensor",
        "rank-0",
        "rank-5",
        "output-map-short",
        "output-map-class-too-big",
        "output-map-negative",
        "output-map-bool",
        "output-map-string-entry",
        "output-map-string",
    ],
)
def test_garbage_is_refused_naming_the_field(
    base_line: EdgeLine, corrupt: Callable[[Doc], None], field: str
) -> None:
    # Prepare
    doc = manifest_doc(base_line)
    corrupt(doc)

    # Execute / Assert
    with pytest.raises(ContractError, match=rf"invalid manifest at {field}\b"):
        ArtifactManifest.from_json(json.dumps(doc))


def test_an_output_map_round_trips_and_decides_the_class(base_line: EdgeLine) -> None:
    # Prepare: output 3 stands for class 8 (a merge), every other output for its own class
    doc = manifest_doc(base_line)
    doc["output_classes"] = [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]

    # Execute
    parsed = ArtifactManifest.from_json(json.dumps(doc))

    # Assert
    assert ArtifactManifest.from_json(parsed.to_json()) == parsed
    assert parsed.class_of_output().tolist() == [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]
    assert base_line.artifact.manifest.class_of_output().tolist() == list(range(10))


def test_thirty_two_probes_are_accepted(base_line: EdgeLine) -> None:
    # Prepare
    doc = manifest_doc(base_line)
    doc["probes"] = [doc["probes"][0]] * 32

    # Execute
    parsed = ArtifactManifest.from_json(json.dumps(doc))

    # Assert
    assert len(parsed.probes) == 32


def test_bad_array_in_a_probe_is_refused_naming_it(base_line: EdgeLine) -> None:
    # Prepare: the probe's logits lose one byte of data.
    doc = manifest_doc(base_line)
    doc["probes"][1]["logits"]["data"] = doc["probes"][1]["logits"]["data"][:-4]

    # Execute / Assert
    with pytest.raises(ContractError, match=r"invalid manifest at probes\.1\.logits"):
        ArtifactManifest.from_json(json.dumps(doc))


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "not json"])
def test_not_a_manifest_document_is_refused(text: str) -> None:
    # Execute / Assert
    with pytest.raises(ContractError, match="invalid manifest"):
        ArtifactManifest.from_json(text)


def _small_head(doc: Doc) -> None:
    doc["head_weight"] = {"dtype": "float32", "shape": [2, 3], "data": "A" * 32}


def _nan_bias(doc: Doc) -> None:
    import base64

    import numpy as np

    doc["head_bias"]["data"] = base64.b64encode(np.full(10, np.nan, dtype="<f4").tobytes()).decode()


def _probe_shape(doc: Doc) -> None:
    doc["probes"][0]["input"] = {"dtype": "float32", "shape": [1, 2], "data": "AAAAAAAAAAA="}


def _feature_dim(doc: Doc) -> None:
    doc["feature_dim"] = 32


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_small_head, "head_weight must be float32 of shape"),
        (_nan_bias, "NaN or Inf"),
        (_probe_shape, "probe 0 does not have the model's tensor shapes"),
        (_feature_dim, "do not fit D=32"),
    ],
    ids=["head-shape", "nan-head", "probe-shape", "feature-dim"],
)
def test_fields_that_contradict_each_other_are_refused(
    base_line: EdgeLine, corrupt: Callable[[Doc], None], reason: str
) -> None:
    # Prepare
    doc = manifest_doc(base_line)
    corrupt(doc)

    # Execute / Assert
    with pytest.raises(ContractError, match=reason):
        ArtifactManifest.from_json(json.dumps(doc))


def test_optional_additions_are_left_out_when_not_set_so_older_devices_read_the_manifest(
    base_line: EdgeLine,
) -> None:
    # Prepare: what a device of diredi.manifest/1 before the additions accepts (extra fields forbidden)
    original = {name for name in ArtifactManifest.model_fields if name not in OPTIONAL_ADDITIONS}
    keys = {"schema" if name == "schema_" else name for name in original}

    # Execute
    document = json.loads(base_line.artifact.manifest.to_json())
    desired_part = json.loads(base_line.artifact.manifest.model_dump_json(by_alias=True))

    # Assert
    assert set(document) == set(desired_part) == keys


def test_pixel_scale_is_for_image_inputs_only(base_line: EdgeLine) -> None:
    # Prepare: the digits model takes flat vectors of 64
    doc = manifest_doc(base_line)
    doc["pixel_scale"] = 255.0

    # Execute / Assert
    with pytest.raises(ContractError, match="pixel_scale is for image inputs B×C×H×W"):
        ArtifactManifest.from_json(json.dumps(doc))
    for bad in (0, -1, "255", float("inf")):
        doc["pixel_scale"] = bad
        with pytest.raises(ContractError, match="pixel_scale"):
            ArtifactManifest.from_json(json.dumps(doc))


def test_a_probe_input_of_another_dtype_is_refused(base_line: EdgeLine) -> None:
    # Prepare
    doc = manifest_doc(base_line)
    doc["probes"][0]["input"]["dtype"] = "int32"

    # Execute / Assert
    with pytest.raises(ContractError, match="probe 0 must hold a float32 or int8 input"):
        ArtifactManifest.from_json(json.dumps(doc))
