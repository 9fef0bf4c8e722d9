"""int8 export: the student → a fully int8 LiteRT flatbuffer (features, logits) and its manifest."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud.exceptions import ExportAttempt, ExportError, ExportGaveUp
from cloud.ml.data import FloatArray, IntArray, Split
from cloud.ml.nets import EdgeStudent
from cloud.ml.quantize import (
    DEFAULT_CALIBRATION,
    Calibration,
    QATConfig,
    float_bytes,
    ptq_bytes,
    qat_bytes,
)
from device_firmware_py.runtime import Int8Model, quantize
from wire import ArtifactManifest, EncodedArray, ProbeOutput, TensorSpec
from wire.common import utcnow
from wire.limits import DEFAULT_MAX_PAYLOAD_BYTES

SIGNATURE = "serving_default"
MAX_INT8_DROP = 0.010
PROBES = 4
# What a manifest may take of a DesiredModel document (DESIGN §2: at most 16 KiB), leaving room for
# the document's other fields (device id, download path, dates, key id, signature: ~400 bytes).
MANIFEST_BUDGET = DEFAULT_MAX_PAYLOAD_BYTES - 1024
# The export's fallbacks, cheapest first: today's calibration, other activation observers over every
# calibration input, the default observer over every input, then a quantization-aware fine-tune.
LADDER: tuple[Calibration | QATConfig, ...] = (
    DEFAULT_CALIBRATION,
    Calibration("minmax", None),
    Calibration("moving-average", None),
    Calibration("histogram", None),
    QATConfig(),
)


@dataclass(frozen=True)
class EdgeArtifact:
    """An exported edge model: the flatbuffer and the manifest that names and checks it."""

    model: bytes
    manifest: ArtifactManifest

    def save(self, directory: Path) -> Path:
        """Write `<model_id>.tflite` and `<model_id>.manifest.json`; return the model's path. By model id,
        not by sha256: a relabelled version shares its parent's bytes under another manifest."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.manifest.model_id}.tflite"
        path.write_bytes(self.model)
        path.with_suffix(".manifest.json").write_text(self.manifest.to_json())
        return path

    def load(self) -> Int8Model:
        """This artifact in the same int8 runtime the devices run."""
        return Int8Model(self.model, self.manifest)


def relabelled(
    artifact: EdgeArtifact, class_of_output: IntArray, *, model_id: str, line: str, version: int
) -> EdgeArtifact:
    """The same int8 model, as a new version whose outputs stand for other classes.

    Every decision is the artifact's own, sent through the map: exact for any relabelling of the
    classes, merges included, which no linear head can be (a merge is a max over two outputs). The
    bytes, probes and head are the artifact's; only the manifest's name and `output_classes` change.
    """
    classes = class_of_output.astype(int).tolist()
    document = artifact.manifest.model_dump(by_alias=True) | {
        "model_id": model_id,
        "line": line,
        "version": version,
        "created_at": utcnow(),
        "output_classes": None if classes == list(range(len(classes))) else classes,
    }
    return EdgeArtifact(model=artifact.model, manifest=ArtifactManifest.model_validate(document))


def _tensor_spec(details: dict[str, Any], name: str) -> TensorSpec:
    scale, zero_point = details["quantization"]
    if details["dtype"] != np.int8 or not scale:
        raise ExportError(f"tensor {name!r} is not int8-quantized; the export must be fully int8")
    shape = [int(s) for s in details["shape"]]
    return TensorSpec(name=name, shape=shape, scale=float(scale), zero_point=int(zero_point))


def export_int8(
    student: EdgeStudent,
    calibration: FloatArray,
    *,
    model_id: str,
    line: str,
    version: int,
    batch: int = 1,
    pixel_scale: float | None = None,
) -> EdgeArtifact:
    """Quantize `student` fully to int8 (weights, activations, input and outputs) and describe it."""
    model = ptq_bytes(student, calibration, DEFAULT_CALIBRATION, batch)
    return _describe(
        model,
        student,
        calibration,
        model_id=model_id,
        line=line,
        version=version,
        batch=batch,
        pixel_scale=pixel_scale,
    )


def _describe(
    model: bytes,
    student: EdgeStudent,
    calibration: FloatArray,
    *,
    model_id: str,
    line: str,
    version: int,
    batch: int,
    pixel_scale: float | None = None,
) -> EdgeArtifact:
    """The artifact of int8 `model`: its manifest with `student`'s float head and the probes' outputs."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model).get_signature_runner(SIGNATURE)
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    if len(inputs) != 1 or set(outputs) != {"output_0", "output_1"}:
        raise ExportError(f"unexpected signature: inputs {list(inputs)}, outputs {list(outputs)}")
    (in_name,) = inputs
    computed_in_float = float_tensors(model)
    if computed_in_float:
        shown = ", ".join(computed_in_float[:3])
        raise ExportError(f"the model is not fully int8: {len(computed_in_float)} float tensors ({shown})")
    head_w = student.head.weight.detach().numpy()
    head_b = student.head.bias.detach().numpy()
    draft = ArtifactManifest(
        model_id=model_id,
        line=line,
        version=version,
        sha256=hashlib.sha256(model).hexdigest(),
        size=len(model),
        signature=SIGNATURE,
        input=_tensor_spec(inputs[in_name], in_name),
        # output_0/output_1 follow the module's return order (features, logits), whatever the
        # flatbuffer's own output order is.
        features=_tensor_spec(outputs["output_0"], "output_0"),
        logits=_tensor_spec(outputs["output_1"], "output_1"),
        num_classes=student.head.out_features,
        feature_dim=student.head.in_features,
        head_weight=EncodedArray.from_numpy(head_w, "float32"),
        head_bias=EncodedArray.from_numpy(head_b, "float32"),
        probes=[],
        pixel_scale=pixel_scale,
    )
    runtime = Int8Model(model, draft)
    probe_x = calibration[: PROBES * batch].reshape(PROBES, batch, *calibration.shape[1:])
    probes = []
    for x in probe_x:
        feats, logits = runtime.run_int8(x)
        probes.append(
            ProbeOutput(
                input=EncodedArray.from_numpy(x, "float32"),
                features=EncodedArray.from_numpy(feats, "int8"),
                logits=EncodedArray.from_numpy(logits, "int8"),
            )
        )
    return EdgeArtifact(model=model, manifest=_fitted(draft, probes))


def _fitted(draft: ArtifactManifest, probes: list[ProbeOutput]) -> ArtifactManifest:
    """The manifest with as many of `probes` as a DesiredModel document can carry (DESIGN §2: 16 KiB).

    Probe inputs stay float32, which every device reads, while the manifest fits; a model with larger
    inputs (images) gets them as int8, the quantized input the model sees, and fewer probes if need
    be (at least one). ExportError if even that does not fit: the head (C×D floats) is too large.
    """
    spec = draft.input
    compact = [
        p.model_copy(update={"input": EncodedArray.from_numpy(quantize(p.input.to_numpy(), spec), "int8")})
        for p in probes
    ]
    for candidates in (probes, *(compact[:n] for n in range(len(compact), 0, -1))):
        manifest = draft.model_copy(update={"probes": list(candidates)})
        if len(manifest.model_dump_json(by_alias=True)) <= MANIFEST_BUDGET:
            return manifest
    size = len(draft.model_copy(update={"probes": compact[:1]}).model_dump_json(by_alias=True))
    raise ExportError(
        f"the manifest is {size} bytes with one probe, more than the {MANIFEST_BUDGET} a signed DesiredModel "
        f"can carry: the head ({draft.num_classes}×{draft.feature_dim} floats) is too large"
    )


def float_file_bytes(student: EdgeStudent, input_shape: tuple[int, ...]) -> int:
    """Size of the same student exported as a float32 LiteRT file, for the size comparison."""
    return len(float_bytes(student, input_shape))


def float_tensors(model: bytes) -> list[str]:
    """Names of the float tensors of a LiteRT flatbuffer: none in a fully int8 model (whose weights and
    activations are int8, its biases and shapes int32)."""
    from ai_edge_litert import schema_py_generated as schema

    floats = (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16, schema.TensorType.FLOAT64)
    root = schema.Model.GetRootAs(model, 0)
    names = []
    for s in range(root.SubgraphsLength()):
        graph = root.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            if tensor.Type() in floats:
                names.append((tensor.Name() or b"?").decode(errors="replace"))
    return names


def weight_tensor_bytes(model: bytes) -> int:
    """Bytes of the constant tensors (weights, biases) stored in a LiteRT flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    used: set[int] = set()
    for s in range(root.SubgraphsLength()):
        graph = root.Subgraphs(s)
        for t in range(graph.TensorsLength()):
            used.add(graph.Tensors(t).Buffer())
    total = 0
    for index in used:
        buffer = root.Buffers(index)
        total += buffer.DataLength() if buffer.DataLength() else int(buffer.Size())
    return total


def float_accuracy(student: EdgeStudent, data: Split, class_of_output: IntArray | None = None) -> float:
    """Accuracy of the float student on `data` (its top output read through `class_of_output`)."""
    with torch.no_grad():
        top = student(torch.from_numpy(data.x)).argmax(1).numpy()
    decided = top if class_of_output is None else class_of_output[top]
    return float((decided == data.y).mean())


def int8_accuracy(artifact: EdgeArtifact, student: EdgeStudent, data: Split) -> tuple[float, float]:
    """(float, int8) accuracy of the student and its artifact on `data`, both through the artifact's
    output map."""
    float_acc = float_accuracy(student, data, artifact.manifest.class_of_output())
    return float_acc, float((artifact.load().predict(data.x) == data.y).mean())


def within_limit(float_acc: float, int8_acc: float, max_drop: float = MAX_INT8_DROP) -> bool:
    """Whether int8 accuracy is at most `max_drop` below float."""
    return float_acc - int8_acc <= max_drop + 1e-9  # exactly at the limit is within it


def check_int8_accuracy(artifact: EdgeArtifact, student: EdgeStudent, val: Split) -> tuple[float, float]:
    """(float, int8) accuracy on `val`; ExportError if int8 loses more than 1.0 point."""
    float_acc, int8_acc = int8_accuracy(artifact, student, val)
    if not within_limit(float_acc, int8_acc):
        raise ExportError(
            f"int8 accuracy {int8_acc:.4f} is {float_acc - int8_acc:.4f} below float {float_acc:.4f} "
            f"(limit {MAX_INT8_DROP})"
        )
    return float_acc, int8_acc


def export_guarded(
    student: EdgeStudent,
    calibration: FloatArray,
    val: Split,
    *,
    model_id: str,
    line: str,
    version: int,
    max_drop: float = MAX_INT8_DROP,
    pixel_scale: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[EdgeStudent, EdgeArtifact, list[ExportAttempt]]:
    """The first int8 export on `LADDER` within `max_drop` of float on `val`, with every attempt.

    The first rung is `export_int8` itself, so a model that passes there gets the same bytes. The
    returned student is `student` unless the QAT rung fine-tuned it; its float weights and head are
    then the fine-tuned ones (the manifest carries that head). A QAT artifact must be within the
    limit of both the float student given and the fine-tuned one. ExportGaveUp if no rung passes.
    """
    float_acc = float_accuracy(student, val)
    attempts: list[ExportAttempt] = []
    rungs = _rungs(len(calibration))
    for done, rung in enumerate(rungs):
        if progress is not None:
            progress(done, len(rungs))
        clock = time.perf_counter()
        candidate, reference = student, float_acc
        if isinstance(rung, QATConfig):
            candidate, model = qat_bytes(student, calibration, rung)
            reference = max(float_acc, float_accuracy(candidate, val))
        else:
            model = ptq_bytes(student, calibration, rung)
        artifact = _describe(
            model,
            candidate,
            calibration,
            model_id=model_id,
            line=line,
            version=version,
            batch=1,
            pixel_scale=pixel_scale,
        )
        _, int8_acc = int8_accuracy(artifact, candidate, val)
        accepted = within_limit(reference, int8_acc, max_drop)
        seconds = time.perf_counter() - clock
        attempts.append(ExportAttempt(rung.method, reference, int8_acc, accepted, seconds))
        if accepted:
            if progress is not None:
                progress(len(rungs), len(rungs))
            return candidate, artifact, attempts
    raise ExportGaveUp(attempts, max_drop)


def _rungs(samples: int) -> list[Calibration | QATConfig]:
    """`LADDER` without a recipe that would repeat an earlier one on this many calibration inputs."""
    rungs: list[Calibration | QATConfig] = []
    seen: set[tuple[str, int]] = set()
    for rung in LADDER:
        if isinstance(rung, Calibration):
            key = (rung.observer, min(samples, rung.samples or samples))
            if key in seen:
                continue
            seen.add(key)
        rungs.append(rung)
    return rungs
