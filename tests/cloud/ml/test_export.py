"""int8 export (DESIGN §3 step 2): a fully int8 LiteRT file, ≤ 30 % of the float weights, checked."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter

from cloud.exceptions import ExportError
from cloud.ml.data import Split
from cloud.ml.export import (
    SIGNATURE,
    EdgeArtifact,
    check_int8_accuracy,
    export_int8,
    float_file_bytes,
    relabelled,
    weight_tensor_bytes,
)
from cloud.ml.nets import EdgeStudent, parameter_count
from device_firmware_py.runtime import Int8Model
from wire import ArtifactManifest

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData
    from cloud.ml.line import EdgeLine


def rolled_head(student: EdgeStudent) -> EdgeStudent:
    """A copy of `student` that answers class c + 1 wherever `student` answers c."""
    broken = copy.deepcopy(student)
    with torch.no_grad():
        broken.head.weight.copy_(torch.roll(student.head.weight, 1, dims=0))
        broken.head.bias.copy_(torch.roll(student.head.bias, 1, dims=0))
    return broken


def float_accuracy(student: EdgeStudent, split: Split) -> float:
    with torch.no_grad():
        return float((student(torch.from_numpy(split.x)).argmax(1).numpy() == split.y).mean())


def test_int8_weights_take_at_most_30_percent_of_float(base_line: EdgeLine) -> None:
    # Prepare
    float_weight_bytes = parameter_count(base_line.student) * 4

    # Execute
    int8_weight_bytes = weight_tensor_bytes(base_line.artifact.model)

    # Assert
    assert 0 < int8_weight_bytes <= 0.3 * float_weight_bytes


def test_int8_file_is_smaller_than_the_float_file(base_line: EdgeLine) -> None:
    # Execute
    float_size = float_file_bytes(base_line.student, (64,))

    # Assert
    assert (
        weight_tensor_bytes(base_line.artifact.model) < parameter_count(base_line.student) * 4 <= float_size
    )
    assert len(base_line.artifact.model) < float_size


def test_manifest_names_the_artifact(base_line: EdgeLine) -> None:
    # Prepare
    artifact = base_line.artifact

    # Execute
    manifest = artifact.manifest

    # Assert
    assert manifest.sha256 == hashlib.sha256(artifact.model).hexdigest()
    assert manifest.size == len(artifact.model)
    assert (manifest.model_id, manifest.line, manifest.version) == ("base.v1", "base", 1)
    assert (manifest.num_classes, manifest.feature_dim) == (10, 64)
    assert manifest.signature == SIGNATURE


def test_manifest_carries_the_float_head(base_line: EdgeLine, base_model: Int8Model) -> None:
    # Execute
    w, b = base_model.head()

    # Assert
    np.testing.assert_array_equal(w, base_line.student.head.weight.detach().numpy())
    np.testing.assert_array_equal(b, base_line.student.head.bias.detach().numpy())


def test_input_and_both_outputs_are_int8(base_line: EdgeLine) -> None:
    # Prepare
    manifest = base_line.artifact.manifest

    # Execute
    runner = Interpreter(model_content=base_line.artifact.model).get_signature_runner(SIGNATURE)
    inputs, outputs = runner.get_input_details(), runner.get_output_details()

    # Assert
    assert set(inputs) == {manifest.input.name}
    assert set(outputs) == {manifest.features.name, manifest.logits.name}
    for details in [*inputs.values(), *outputs.values()]:
        assert details["dtype"] == np.int8
        scale, _ = details["quantization"]
        assert scale > 0
    assert outputs[manifest.features.name]["shape"].tolist() == [1, 64]
    assert outputs[manifest.logits.name]["shape"].tolist() == [1, 10]


def test_probes_pass_the_devices_self_test(base_model: Int8Model) -> None:
    # Prepare
    probes = base_model.manifest.probes

    # Execute
    base_model.self_test()

    # Assert
    assert len(probes) == 4


def test_int8_accuracy_is_within_a_point_of_float(base_line: EdgeLine, small_data: ScenarioData) -> None:
    # Execute
    float_acc, int8_acc = check_int8_accuracy(base_line.artifact, base_line.student, small_data.val)

    # Assert
    assert float_acc == float_accuracy(base_line.student, small_data.val)
    assert float_acc > 0.9
    assert float_acc - int8_acc <= 0.010


@pytest.fixture(scope="module")
def rolled_artifact(base_line: EdgeLine, small_data: ScenarioData) -> EdgeArtifact:
    """The int8 export of a student whose head answers c + 1 where the base student answers c."""
    return export_int8(
        rolled_head(base_line.student), small_data.train.x, model_id="base.v9", line="base", version=9
    )


def test_int8_accuracy_far_below_float_is_an_export_error(
    base_line: EdgeLine, rolled_artifact: EdgeArtifact, small_data: ScenarioData
) -> None:
    # Prepare: the rolled artifact checked against the good student it is supposed to be
    good_float = float_accuracy(base_line.student, small_data.val)
    broken_int8 = float((rolled_artifact.load().predict(small_data.val.x) == small_data.val.y).mean())
    assert good_float - broken_int8 > 0.5

    # Execute
    with pytest.raises(ExportError) as caught:
        check_int8_accuracy(rolled_artifact, base_line.student, small_data.val)

    # Assert
    assert "below float" in str(caught.value)
    assert "limit 0.01" in str(caught.value)


def test_int8_exactly_one_point_below_float_is_accepted(
    base_line: EdgeLine, rolled_artifact: EdgeArtifact, small_data: ScenarioData
) -> None:
    # Prepare: 100 inputs on which float and int8 disagree; labels chosen so that float is right on
    # 50 and int8 on 49 (the last one is right for neither): exactly 1.0 point apart
    x = small_data.val.x
    with torch.no_grad():
        float_pred = base_line.student(torch.from_numpy(x)).argmax(1).numpy()
    int8_pred = rolled_artifact.load().predict(x)
    disagree = np.flatnonzero(float_pred != int8_pred)[:100]
    assert len(disagree) == 100
    f, g = float_pred[disagree], int8_pred[disagree]
    neither = next(c for c in range(10) if c not in (f[99], g[99]))
    labels = np.concatenate([f[:50], g[50:99], [neither]]).astype(np.int64)
    split = Split(x=x[disagree], y=labels)

    # Execute
    float_acc, int8_acc = check_int8_accuracy(rolled_artifact, base_line.student, split)

    # Assert
    assert (float_acc, int8_acc) == (0.5, 0.49)


def test_save_writes_the_artifact_and_its_manifest_by_model_id(base_line: EdgeLine, tmp_path: Path) -> None:
    # Prepare: a relabelled version shares the base's bytes under another manifest
    artifact = base_line.artifact
    merged = relabelled(
        artifact, np.array([0, 1, 2, 8, 4, 5, 6, 7, 8, 9]), model_id="base.v2", line="base", version=2
    )
    directory = tmp_path / "artifacts" / "base"

    # Execute
    paths = [a.save(directory) for a in (artifact, merged)]

    # Assert: each version has its own pair of files; neither overwrote the other
    assert paths == [directory / "base.v1.tflite", directory / "base.v2.tflite"]
    names = ["base.v1.tflite", "base.v1.manifest.json", "base.v2.tflite", "base.v2.manifest.json"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)
    for a, path in zip((artifact, merged), paths, strict=True):
        assert path.read_bytes() == artifact.model
        assert ArtifactManifest.from_json(path.with_suffix(".manifest.json").read_text()) == a.manifest
    assert merged.manifest.output_classes == [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]
    assert merged.manifest.sha256 == artifact.manifest.sha256


def test_saved_artifact_loads_in_the_device_runtime(
    base_line: EdgeLine, base_model: Int8Model, small_data: ScenarioData, tmp_path: Path
) -> None:
    # Prepare
    path = base_line.artifact.save(tmp_path)

    # Execute
    loaded = Int8Model.from_files(path, path.with_suffix(".manifest.json"))

    # Assert
    np.testing.assert_array_equal(loaded.predict(small_data.val.x), base_model.predict(small_data.val.x))
