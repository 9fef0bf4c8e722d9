"""int8 export: the student → a fully int8 LiteRT flatbuffer (features, logits) and its manifest."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from cloud.exceptions import ExportError
from cloud.ml.data import Split
from cloud.ml.nets import Student, TwoOutputs
from device_firmware_py.runtime import Int8Model
from wire import ArtifactManifest, EncodedArray, ProbeOutput, TensorSpec

SIGNATURE = "serving_default"
MAX_INT8_DROP = 0.010
CALIBRATION_SAMPLES = 512
PROBES = 4


@dataclass(frozen=True)
class EdgeArtifact:
    """An exported edge model: the flatbuffer and the manifest that names and checks it."""

    model: bytes
    manifest: ArtifactManifest

    def save(self, directory: Path) -> Path:
        """Write `<sha256>.tflite` and `<sha256>.manifest.json`; return the model's path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.manifest.sha256}.tflite"
        path.write_bytes(self.model)
        path.with_suffix(".manifest.json").write_text(self.manifest.to_json())
        return path

    def load(self) -> Int8Model:
        """This artifact in the same int8 runtime the devices run."""
        return Int8Model(self.model, self.manifest)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converter, which prints progress and C++ logs straight to stdout and stderr.

    File descriptors 1 and 2 are redirected to a temporary file; if the conversion fails, its tail
    goes into the ExportError so nothing useful is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        except Exception as exc:
            sink.seek(0)
            tail = sink.read()[-2000:].decode(errors="replace")
            raise ExportError(f"conversion failed: {exc}\n{tail}") from exc
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _convert(student: Student, calibration: npt.NDArray[np.float32] | None, batch: int) -> bytes:
    module = TwoOutputs(copy.deepcopy(student)).eval()
    example = (torch.zeros(batch, student.spec.input_dim),)
    with _quiet():
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import quantize_pt2e

        if calibration is None:
            return bytes(litert_torch.convert(module, example).model_content())
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
        )
        graph = torch.export.export(module, example).module()
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():  # the export has a fixed batch, so calibrate at that batch
            usable = len(calibration) - len(calibration) % batch
            for start in range(0, usable, batch):
                prepared(torch.from_numpy(calibration[start : start + batch]))
        quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
        return bytes(litert_torch.convert(quantized, example, quant_config=config).model_content())


def _tensor_spec(details: dict[str, Any], name: str) -> TensorSpec:
    scale, zero_point = details["quantization"]
    if details["dtype"] != np.int8 or not scale:
        raise ExportError(f"tensor {name!r} is not int8-quantized; the export must be fully int8")
    shape = [int(s) for s in details["shape"]]
    return TensorSpec(name=name, shape=shape, scale=float(scale), zero_point=int(zero_point))


def export_int8(
    student: Student,
    calibration: npt.NDArray[np.float32],
    *,
    model_id: str,
    line: str,
    version: int,
    batch: int = 1,
) -> EdgeArtifact:
    """Quantize `student` fully to int8 (weights, activations, input and outputs) and describe it."""
    calib = calibration[:CALIBRATION_SAMPLES]
    model = _convert(student, calib, batch)
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model).get_signature_runner(SIGNATURE)
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    if len(inputs) != 1 or set(outputs) != {"output_0", "output_1"}:
        raise ExportError(f"unexpected signature: inputs {list(inputs)}, outputs {list(outputs)}")
    (in_name,) = inputs
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
        num_classes=student.spec.num_classes,
        feature_dim=student.spec.feature_dim,
        head_weight=EncodedArray.from_numpy(head_w, "float32"),
        head_bias=EncodedArray.from_numpy(head_b, "float32"),
        probes=[],
    )
    runtime = Int8Model(model, draft)
    probe_x = calib[: PROBES * batch].reshape(PROBES, batch, -1)
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
    return EdgeArtifact(model=model, manifest=draft.model_copy(update={"probes": probes}))


def float_file_bytes(student: Student) -> int:
    """Size of the same student exported as a float32 LiteRT file, for the size comparison."""
    return len(_convert(student, None, 1))


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


def int8_accuracy(artifact: EdgeArtifact, student: Student, data: Split) -> tuple[float, float]:
    """(float, int8) accuracy of the student and its artifact on `data`."""
    with torch.no_grad():
        float_acc = float((student(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).mean())
    return float_acc, float((artifact.load().predict(data.x) == data.y).mean())


def check_int8_accuracy(artifact: EdgeArtifact, student: Student, val: Split) -> tuple[float, float]:
    """(float, int8) accuracy on `val`; ExportError if int8 loses more than 1.0 point."""
    float_acc, int8_acc = int8_accuracy(artifact, student, val)
    if float_acc - int8_acc > MAX_INT8_DROP + 1e-9:  # exactly 1.0 point is within the limit
        raise ExportError(
            f"int8 accuracy {int8_acc:.4f} is {float_acc - int8_acc:.4f} below float {float_acc:.4f} "
            f"(limit {MAX_INT8_DROP})"
        )
    return float_acc, int8_acc
