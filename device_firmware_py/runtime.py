"""The int8 runtime: runs an exported LiteRT/TFLite edge model and returns float features and logits."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_firmware_py.exceptions import ArtifactError
from wire import ArtifactManifest, ContractError, TensorSpec

try:  # LiteRT is the runtime we ship; tflite-runtime (numpy<2) works where LiteRT has no wheel.
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - exercised only on devices without LiteRT
    from tflite_runtime.interpreter import Interpreter

FloatArray = npt.NDArray[np.float32]
_RUNTIME_ERRORS = (ValueError, RuntimeError, TypeError, KeyError, UnicodeDecodeError)
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024


def quantize(x: npt.ArrayLike, spec: TensorSpec) -> npt.NDArray[np.int8]:
    """Affine int8 quantization of float `x` with the tensor's scale and zero point."""
    q = np.round(np.asarray(x, dtype=np.float32) / spec.scale) + spec.zero_point
    out: npt.NDArray[np.int8] = np.clip(q, -128, 127).astype(np.int8)
    return out


def dequantize(q: npt.NDArray[np.int8], spec: TensorSpec) -> FloatArray:
    """Float values of int8 `q` under the tensor's scale and zero point."""
    return ((q.astype(np.float32) - spec.zero_point) * spec.scale).astype(np.float32)


def softmax(z: FloatArray) -> FloatArray:
    """Row-wise softmax, stable for large logits."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: FloatArray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def pool_outputs(p: FloatArray, class_of_output: npt.NDArray[np.int64]) -> FloatArray:
    """Per-output probabilities (N×C) summed into the classes the outputs stand for."""
    pooled = np.zeros_like(p)
    for k, c in enumerate(class_of_output):
        pooled[:, c] += p[:, k]
    return pooled


class Int8Model:
    """One loaded int8 edge model. Inputs are float; quantization happens here, as on the device."""

    def __init__(self, model: bytes, manifest: ArtifactManifest) -> None:
        if len(model) != manifest.size or hashlib.sha256(model).hexdigest() != manifest.sha256:
            raise ArtifactError("artifact does not match its manifest (size or sha256)")
        self.manifest = manifest
        # A corrupt flatbuffer can fail anywhere in the interpreter's Python layer, with any of these.
        try:
            self._interpreter = Interpreter(model_content=model, num_threads=1)
            self._runner: Any = self._interpreter.get_signature_runner(manifest.signature)
            self._check_signature()
        except _RUNTIME_ERRORS as exc:
            raise ArtifactError(f"artifact cannot be loaded: {type(exc).__name__}: {exc}") from None
        self.batch = manifest.input.shape[0]

    @classmethod
    def from_files(cls, model_path: Path, manifest_path: Path) -> Int8Model:
        """Load an artifact and its manifest from disk, refusing oversized files before reading them."""
        try:
            size = model_path.stat().st_size
            if size > MAX_ARTIFACT_BYTES:
                raise ArtifactError(f"artifact of {size} bytes exceeds {MAX_ARTIFACT_BYTES}")
            manifest = ArtifactManifest.from_json(manifest_path.read_bytes())
            model = model_path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read {exc.filename}: {exc.strerror}") from None
        except ContractError as exc:
            raise ArtifactError(str(exc)) from None
        return cls(model, manifest)

    def _check_signature(self) -> None:
        inputs = self._runner.get_input_details()
        outputs = self._runner.get_output_details()
        m = self.manifest
        for spec, details in ((m.input, inputs), (m.features, outputs), (m.logits, outputs)):
            d = details.get(spec.name)
            if d is None:
                raise ArtifactError(f"artifact has no tensor {spec.name!r} in signature {m.signature!r}")
            scale, zero_point = d["quantization"]
            if (
                d["dtype"] != np.int8
                or list(d["shape"]) != spec.shape
                or not np.isclose(scale, spec.scale, rtol=1e-6)
                or zero_point != spec.zero_point
            ):
                raise ArtifactError(f"tensor {spec.name!r} does not match the manifest")

    def run_int8(self, x: npt.ArrayLike) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.int8]]:
        """Raw int8 (features, logits) for a batch of float inputs, in the model's fixed batch size."""
        sample_shape = tuple(self.manifest.input.shape[1:])
        xs = np.asarray(x, dtype=np.float32)
        if xs.shape == sample_shape:
            xs = xs[None]
        if xs.shape[1:] != sample_shape:
            raise ValueError(f"inputs of shape {xs.shape} do not fit the model's samples of {sample_shape}")
        n, b = xs.shape[0], self.batch
        feats = np.empty((n, *self.manifest.features.shape[1:]), dtype=np.int8)
        logits = np.empty((n, *self.manifest.logits.shape[1:]), dtype=np.int8)
        for start in range(0, n, b):
            chunk = xs[start : start + b]
            if len(chunk) < b:  # the exported graph has a fixed batch; pad the tail
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), np.float32)])
            # Reshape to the model's exact input shape: the runner would silently resize otherwise.
            try:
                out = self._runner(**{self.manifest.input.name: quantize(chunk, self.manifest.input)})
            except _RUNTIME_ERRORS as exc:
                raise ArtifactError(f"artifact failed to run: {type(exc).__name__}: {exc}") from None
            k = min(b, n - start)
            feats[start : start + k] = out[self.manifest.features.name][:k]
            logits[start : start + k] = out[self.manifest.logits.name][:k]
        return feats, logits

    def run(self, x: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Dequantized (features, logits) for a batch of float inputs."""
        feats, logits = self.run_int8(x)
        return dequantize(feats, self.manifest.features), dequantize(logits, self.manifest.logits)

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The class of the top-1 output per input (the manifest's `output_classes`)."""
        return self.decide(self.run_int8(x)[1])

    def decide(self, logits: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """The class each row of logits (int8 or dequantized) decides: its top output's class."""
        decided: npt.NDArray[np.int64] = self.manifest.class_of_output()[np.argmax(logits, axis=1)]
        return decided

    def class_probabilities(self, logits: FloatArray) -> FloatArray:
        """The model's belief per class for dequantized logits: softmax over the outputs, pooled into
        the classes they stand for."""
        return pool_outputs(softmax(logits), self.manifest.class_of_output())

    def self_test(self) -> None:
        """Compare the manifest's probe outputs with this runtime's; raise ArtifactError on mismatch."""
        for i, probe in enumerate(self.manifest.probes):
            x = probe.input.to_numpy()
            if x.dtype == np.int8:  # the quantized input itself: its float values quantize back to it
                x = dequantize(x.astype(np.int8), self.manifest.input)
            feats, logits = self.run_int8(x)
            # One int8 step of slack: kernels may round differently across CPUs.
            for name, got, want in (("features", feats, probe.features), ("logits", logits, probe.logits)):
                diff = np.abs(got.astype(np.int16) - want.to_numpy().astype(np.int16))
                if diff.max(initial=0) > 1:
                    raise ArtifactError(f"self-test failed: probe {i} {name} differs by {int(diff.max())}")

    def head(self) -> tuple[FloatArray, FloatArray]:
        """The float head (W: C×D, b: C) the manifest carries, for RD."""
        w = self.manifest.head_weight.to_numpy().astype(np.float32)
        b = self.manifest.head_bias.to_numpy().astype(np.float32)
        return w, b
