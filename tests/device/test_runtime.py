"""device_firmware_py.runtime.Int8Model on the real exported artifact, in the real LiteRT interpreter."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

from device_firmware_py import runtime
from device_firmware_py.exceptions import ArtifactError
from device_firmware_py.runtime import Int8Model, dequantize
from wire import ArtifactManifest, EncodedArray

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.export import EdgeArtifact
    from cloud.ml.line import EdgeLine

NUM_CLASSES, FEATURE_DIM = 10, 64


def vouched_for(manifest: ArtifactManifest, model: bytes) -> ArtifactManifest:
    """`manifest` with the sha256 and size of `model`, so that only the bytes themselves are wrong."""
    return manifest.model_copy(update={"sha256": hashlib.sha256(model).hexdigest(), "size": len(model)})


def flip(model: bytes, offset: int, mask: int = 0xFF) -> bytes:
    """`model` with the byte at `offset` XOR-ed with `mask`."""
    corrupted = bytearray(model)
    corrupted[offset] ^= mask
    return bytes(corrupted)


def offset_in(model: bytes, view: npt.NDArray[Any]) -> int:
    """Offset in `model` of a numpy view into it (the flatbuffer accessors return views, not copies)."""
    start = (
        view.__array_interface__["data"][0] - np.frombuffer(model, np.uint8).__array_interface__["data"][0]
    )
    assert model[start : start + view.nbytes] == view.tobytes()
    return int(start)


def int8_constant(model: bytes, shape: list[int]) -> tuple[Any, int]:
    """The int8 constant tensor of `shape` in the flatbuffer, and the file offset of its data."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0)
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        buffer = root.Buffers(tensor.Buffer())
        if (
            tensor.Type() == schema.TensorType.INT8
            and buffer.DataLength()
            and list(tensor.ShapeAsNumpy()) == shape
        ):
            return tensor, offset_in(model, buffer.DataAsNumpy())
    raise AssertionError(f"no int8 constant of shape {shape}")


@pytest.fixture(scope="module")
def batch4_artifact(base_line: EdgeLine, small_data: ScenarioData) -> EdgeArtifact:
    """The base student exported with a fixed batch of 4, to exercise the padding of a partial batch."""
    from cloud.ml.export import export_int8

    return export_int8(
        base_line.student, small_data.train.x, model_id="base.b4", line="base", version=1, batch=4
    )


def test_loads_the_real_artifact(base_line: EdgeLine) -> None:
    # Prepare
    artifact = base_line.artifact

    # Execute
    model = Int8Model(artifact.model, artifact.manifest)

    # Assert
    assert model.manifest == artifact.manifest
    assert model.batch == artifact.manifest.input.shape[0]


@pytest.mark.parametrize("n", [1, 7, 37])
def test_run_returns_float_features_and_logits(
    base_model: Int8Model, small_data: ScenarioData, n: int
) -> None:
    # Prepare
    x = small_data.test.x[:n]

    # Execute
    features, logits = base_model.run(x)

    # Assert
    assert features.shape == (n, FEATURE_DIM)
    assert logits.shape == (n, NUM_CLASSES)
    assert features.dtype == logits.dtype == np.float32
    assert np.isfinite(features).all()
    assert (features >= 0).all()  # the backbone ends in a ReLU
    assert features.std() > 0


def test_run_is_the_dequantized_int8_output(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    x = small_data.test.x[:20]

    # Execute
    features, logits = base_model.run(x)
    q_features, q_logits = base_model.run_int8(x)

    # Assert
    assert q_features.dtype == q_logits.dtype == np.int8
    np.testing.assert_array_equal(features, dequantize(q_features, base_model.manifest.features))
    np.testing.assert_array_equal(logits, dequantize(q_logits, base_model.manifest.logits))


def test_run_of_no_inputs_is_empty(base_model: Int8Model) -> None:
    # Execute
    features, logits = base_model.run(np.zeros((0, FEATURE_DIM), np.float32))

    # Assert
    assert features.shape == (0, FEATURE_DIM)
    assert logits.shape == (0, NUM_CLASSES)


@pytest.mark.parametrize("n", [1, 5, 37])
def test_partial_batch_gives_the_same_rows_as_one_by_one(
    batch4_artifact: EdgeArtifact, small_data: ScenarioData, n: int
) -> None:
    # Prepare
    model = batch4_artifact.load()
    x = small_data.test.x[:n]

    # Execute
    features, logits = model.run_int8(x)
    singles = [model.run_int8(np.repeat(row[None], 4, axis=0)) for row in x]

    # Assert
    assert model.batch == 4
    assert n % 4 != 0
    assert features.shape == (n, FEATURE_DIM)
    assert logits.shape == (n, NUM_CLASSES)
    np.testing.assert_array_equal(features, np.stack([f[0] for f, _ in singles]))
    np.testing.assert_array_equal(logits, np.stack([g[0] for _, g in singles]))


def test_batched_export_predicts_like_the_unbatched_one(
    batch4_artifact: EdgeArtifact, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    x = small_data.test.x[:101]

    # Execute
    batched = batch4_artifact.load().predict(x)
    unbatched = base_model.predict(x)

    # Assert
    assert np.mean(batched == unbatched) >= 0.98


def test_predict_is_the_argmax_of_the_logits(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    x = small_data.test.x

    # Execute
    predicted = base_model.predict(x)
    _, logits = base_model.run(x)

    # Assert
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, np.argmax(logits, axis=1))


MERGE_3_INTO_8 = [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]


def under_map(base_line: EdgeLine, classes: list[int]) -> Int8Model:
    """The base artifact's bytes under a manifest whose outputs stand for `classes`."""
    manifest = base_line.artifact.manifest.model_copy(update={"output_classes": classes})
    return Int8Model(base_line.artifact.model, manifest)


def test_an_output_map_relabels_every_decision_exactly(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare: output 3 stands for class 8 (the user merges 3 into 8)
    mapped = under_map(base_line, MERGE_3_INTO_8)
    x = small_data.test.x

    # Execute
    before, after = base_model.predict(x), mapped.predict(x)

    # Assert: the same int8 decisions, sent through the map; class 3 is never decided
    mapped.self_test()
    np.testing.assert_array_equal(after, np.array(MERGE_3_INTO_8)[before])
    assert (before == 3).any() and not (after == 3).any()


def test_class_probabilities_pool_the_outputs_of_a_class(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    mapped = under_map(base_line, MERGE_3_INTO_8)
    _, logits = base_model.run(small_data.test.x[:50])

    # Execute
    own, pooled = base_model.class_probabilities(logits), mapped.class_probabilities(logits)

    # Assert: identity map → the softmax; the merge adds output 3's belief to class 8
    np.testing.assert_allclose(own, runtime.softmax(logits), rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 8], own[:, 3] + own[:, 8], rtol=1e-5)
    assert not pooled[:, 3].any()
    np.testing.assert_allclose(pooled.sum(axis=1), 1.0, rtol=1e-5)


def test_self_test_passes_on_the_real_artifact(base_model: Int8Model) -> None:
    # Execute / Assert (raises on a mismatch)
    base_model.self_test()
    assert len(base_model.manifest.probes) > 0


def test_accuracy_on_the_presumed_test_split(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    test = small_data.test

    # Execute
    accuracy = float(np.mean(base_model.predict(test.x) == test.y))

    # Assert
    assert accuracy > 0.9


def test_head_is_the_manifest_float_head(base_model: Int8Model) -> None:
    # Execute
    w, b = base_model.head()

    # Assert
    assert w.shape == (NUM_CLASSES, FEATURE_DIM)
    assert b.shape == (NUM_CLASSES,)
    assert w.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(w, base_model.manifest.head_weight.to_numpy())


def test_float_head_on_int8_features_predicts_like_the_int8_logits(
    base_model: Int8Model, small_data: ScenarioData
) -> None:
    # Prepare
    x = small_data.test.x
    w, b = base_model.head()

    # Execute
    features, _ = base_model.run(x)
    float_head = np.argmax(features @ w.T + b, axis=1)

    # Assert
    assert np.mean(float_head == base_model.predict(x)) >= 0.97


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.999])
def test_truncated_bytes_are_refused(base_line: EdgeLine, keep: float) -> None:
    # Prepare
    model = base_line.artifact.model[: int(len(base_line.artifact.model) * keep)]
    manifest = vouched_for(base_line.artifact.manifest, model)

    # Execute / Assert
    with pytest.raises(ArtifactError):
        Int8Model(model, manifest)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_are_refused(base_line: EdgeLine, seed: int) -> None:
    # Prepare
    model = np.random.default_rng(seed).bytes(len(base_line.artifact.model))
    manifest = vouched_for(base_line.artifact.manifest, model)

    # Execute / Assert
    with pytest.raises(ArtifactError):
        Int8Model(model, manifest)


def test_empty_bytes_are_refused(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest.model_copy(update={"sha256": hashlib.sha256(b"").hexdigest()})

    # Execute / Assert
    with pytest.raises(ArtifactError):
        Int8Model(b"", manifest)


def test_flipped_weight_byte_fails_the_self_test(base_line: EdgeLine) -> None:
    # Prepare: flip the sign bit of the head weight that multiplies probe 0's strongest feature,
    # in the middle row of the head: that moves a logit of probe 0 by many int8 steps.
    artifact = base_line.artifact
    _, head_offset = int8_constant(artifact.model, [NUM_CLASSES, FEATURE_DIM])
    strongest = int(np.argmax(artifact.manifest.probes[0].features.to_numpy()[0]))
    model = flip(artifact.model, head_offset + (NUM_CLASSES // 2) * FEATURE_DIM + strongest, 0x80)
    manifest = vouched_for(artifact.manifest, model)

    # Execute / Assert
    with pytest.raises(ArtifactError, match="self-test failed"):
        Int8Model(model, manifest).self_test()


def test_corrupt_tensor_name_is_an_artifact_error(base_line: EdgeLine) -> None:
    # Prepare: 0xFF XOR on the first byte of an output tensor's name gives invalid UTF-8.
    artifact = base_line.artifact
    name = artifact.manifest.logits.name.encode()
    offset = artifact.model.find(b"serving_default_" + name)
    model = flip(artifact.model, offset)
    manifest = vouched_for(artifact.manifest, model)

    # Execute / Assert
    assert offset > 0
    with pytest.raises(ArtifactError):
        Int8Model(model, manifest)


def test_corrupt_quantization_parameter_is_an_artifact_error(base_line: EdgeLine) -> None:
    # Prepare: int8 weights are symmetric (zero point 0); the delegate refuses any other zero point.
    artifact = base_line.artifact
    tensor, _ = int8_constant(artifact.model, [NUM_CLASSES, FEATURE_DIM])
    zero_points = tensor.Quantization().ZeroPointAsNumpy()
    model = flip(artifact.model, offset_in(artifact.model, zero_points))
    manifest = vouched_for(artifact.manifest, model)

    # Execute / Assert
    with pytest.raises(ArtifactError):
        Int8Model(model, manifest).self_test()


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_bytes_not_matching_the_manifest_are_refused(base_line: EdgeLine, field: str) -> None:
    # Prepare
    artifact = base_line.artifact
    wrong = {"sha256": hashlib.sha256(b"other").hexdigest(), "size": artifact.manifest.size + 1}
    manifest = artifact.manifest.model_copy(update={field: wrong[field]})

    # Execute / Assert
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        Int8Model(artifact.model, manifest)


def test_one_flipped_byte_with_the_original_manifest_is_refused(base_line: EdgeLine) -> None:
    # Prepare
    artifact = base_line.artifact
    model = flip(artifact.model, len(artifact.model) // 2)

    # Execute / Assert
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        Int8Model(model, artifact.manifest)


@pytest.mark.parametrize("tensor", ["input", "features", "logits"])
def test_manifest_naming_a_missing_tensor_is_refused(base_line: EdgeLine, tensor: str) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    spec = getattr(manifest, tensor).model_copy(update={"name": "no_such_tensor"})
    wrong = manifest.model_copy(update={tensor: spec})

    # Execute / Assert
    with pytest.raises(ArtifactError, match="no_such_tensor"):
        Int8Model(base_line.artifact.model, wrong)


@pytest.mark.parametrize(
    ("tensor", "field", "wrong"),
    [
        ("input", "scale", lambda scale: scale * 2),
        ("features", "scale", lambda scale: scale * 1.01),
        ("logits", "scale", lambda scale: scale / 2),
        ("logits", "zero_point", lambda zero_point: zero_point + 1),
        ("input", "shape", lambda shape: [2, *shape[1:]]),
    ],
    ids=["input-scale", "features-scale", "logits-scale", "logits-zero-point", "input-batch"],
)
def test_manifest_with_wrong_quantization_or_shape_is_refused(
    base_line: EdgeLine, tensor: str, field: str, wrong: Callable[[Any], Any]
) -> None:
    # Prepare
    manifest = base_line.artifact.manifest
    spec = getattr(manifest, tensor)
    bad_spec = spec.model_copy(update={field: wrong(getattr(spec, field))})
    bad_manifest = manifest.model_copy(update={tensor: bad_spec})

    # Execute / Assert
    with pytest.raises(ArtifactError, match=f"tensor {spec.name!r} does not match the manifest"):
        Int8Model(base_line.artifact.model, bad_manifest)


def test_manifest_naming_a_missing_signature_is_refused(base_line: EdgeLine) -> None:
    # Prepare
    wrong = base_line.artifact.manifest.model_copy(update={"signature": "no_such_signature"})

    # Execute / Assert
    with pytest.raises(ArtifactError):
        Int8Model(base_line.artifact.model, wrong)


@pytest.mark.parametrize("output", ["features", "logits"])
def test_self_test_fails_when_expected_outputs_are_off_by_five(base_line: EdgeLine, output: str) -> None:
    # Prepare: move every expected int8 value of the last probe by 5 steps, staying in range.
    artifact = base_line.artifact
    probes = list(artifact.manifest.probes)
    expected = getattr(probes[-1], output).to_numpy().astype(np.int16)
    altered = np.where(expected > 0, expected - 5, expected + 5)
    probes[-1] = probes[-1].model_copy(update={output: EncodedArray.from_numpy(altered, "int8")})
    model = Int8Model(artifact.model, artifact.manifest.model_copy(update={"probes": probes}))

    # Execute / Assert
    with pytest.raises(ArtifactError, match=f"probe {len(probes) - 1} {output} differs by 5"):
        model.self_test()


def test_self_test_tolerates_one_step(base_line: EdgeLine) -> None:
    # Prepare
    artifact = base_line.artifact
    probe = artifact.manifest.probes[0]
    expected = probe.logits.to_numpy().astype(np.int16)
    nudged = np.where(expected > 0, expected - 1, expected + 1)
    probes = [probe.model_copy(update={"logits": EncodedArray.from_numpy(nudged, "int8")})]
    model = Int8Model(artifact.model, artifact.manifest.model_copy(update={"probes": probes}))

    # Execute / Assert (no exception)
    model.self_test()


def test_from_files_reads_a_saved_artifact(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData, tmp_path: Path
) -> None:
    # Prepare
    model_path = base_line.artifact.save(tmp_path)

    # Execute
    loaded = Int8Model.from_files(model_path, model_path.with_suffix(".manifest.json"))

    # Assert
    assert loaded.manifest == base_line.artifact.manifest
    loaded.self_test()
    np.testing.assert_array_equal(loaded.predict(small_data.test.x), base_model.predict(small_data.test.x))


def test_from_files_refuses_an_oversized_file_before_reading_anything(
    base_line: EdgeLine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a limit one byte below the artifact; the manifest path does not even exist.
    model_path = base_line.artifact.save(tmp_path)
    monkeypatch.setattr(runtime, "MAX_ARTIFACT_BYTES", len(base_line.artifact.model) - 1)

    # Execute / Assert
    with pytest.raises(ArtifactError, match="exceeds"):
        Int8Model.from_files(model_path, tmp_path / "missing.manifest.json")


def test_from_files_accepts_a_file_exactly_at_the_limit(
    base_line: EdgeLine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    model_path = base_line.artifact.save(tmp_path)
    monkeypatch.setattr(runtime, "MAX_ARTIFACT_BYTES", len(base_line.artifact.model))

    # Execute
    loaded = Int8Model.from_files(model_path, model_path.with_suffix(".manifest.json"))

    # Assert
    assert loaded.manifest.sha256 == base_line.artifact.manifest.sha256


def test_from_files_refuses_a_file_that_does_not_match_its_manifest(
    base_line: EdgeLine, tmp_path: Path
) -> None:
    # Prepare
    model_path = base_line.artifact.save(tmp_path)
    model_path.write_bytes(flip(base_line.artifact.model, 100))

    # Execute / Assert
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        Int8Model.from_files(model_path, model_path.with_suffix(".manifest.json"))


def test_probes_with_int8_inputs_self_test_like_their_float_inputs(base_line: EdgeLine) -> None:
    # Prepare: the probes as a model with large inputs carries them, its quantized inputs
    from device_firmware_py.runtime import quantize

    artifact = base_line.artifact
    spec = artifact.manifest.input
    probes = [
        p.model_copy(update={"input": EncodedArray.from_numpy(quantize(p.input.to_numpy(), spec), "int8")})
        for p in artifact.manifest.probes
    ]
    tampered = probes[0].logits.to_numpy().astype(np.int16)
    wrong = probes[0].model_copy(
        update={"logits": EncodedArray.from_numpy(np.where(tampered > 0, tampered - 5, tampered + 5), "int8")}
    )

    # Execute / Assert: the same outputs pass, wrong ones are caught
    Int8Model(artifact.model, artifact.manifest.model_copy(update={"probes": probes})).self_test()
    with pytest.raises(ArtifactError, match="probe 0 logits differs by 5"):
        Int8Model(artifact.model, artifact.manifest.model_copy(update={"probes": [wrong]})).self_test()
