"""PT2E int8 quantization of the student to LiteRT bytes: calibrated (PTQ) or fine-tuned (QAT)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from cloud.exceptions import ExportError
from cloud.ml.nets import EdgeStudent, TwoOutputs

if TYPE_CHECKING:
    from torch.fx import GraphModule

FloatArray = npt.NDArray[np.float32]
Observer = Literal["histogram", "minmax", "moving-average"]

CALIBRATION_SAMPLES = 512
ACT_EPS = 2**-12  # the activation observers' eps in litert-torch's own config


@dataclass(frozen=True)
class Calibration:
    """A PTQ recipe: the activation observer and how many calibration inputs it sees (None: all)."""

    observer: Observer
    samples: int | None

    @property
    def method(self) -> str:
        """Its name in the export's record, e.g. "ptq-histogram-512"."""
        return f"ptq-{self.observer}-{self.samples or 'all'}"


@dataclass(frozen=True)
class QATConfig:
    """A short quantization-aware fine-tune towards the float student's own outputs."""

    epochs: int = 4
    batch: int = 32
    lr: float = 3e-4
    temperature: float = 2.0
    seed: int = 0

    @property
    def method(self) -> str:
        """Its name in the export's record."""
        return "qat"


DEFAULT_CALIBRATION = Calibration("histogram", CALIBRATION_SAMPLES)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def _quantizer(observer: Observer | None) -> Any:
    """litert-torch's symmetric per-channel quantizer; `observer` swaps the activation observer,
    None asks for the QAT (fake-quantize) flavour."""
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import observer as obs

    quantizer = pt2e_quantizer.PT2EQuantizer()
    if observer is None:
        config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
        # Its QAT-only patterns fold conv + batch norm, which the student has none of, and tracing
        # them fails under this torchao; the dense patterns are the same as for PTQ.
        quantizer.STATIC_QAT_ONLY_OPS = []
        return quantizer.set_global(config)
    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    if observer != "histogram":  # litert-torch's default, kept untouched for identical bytes
        ctr = {"minmax": obs.MinMaxObserver, "moving-average": obs.MovingAverageMinMaxObserver}[observer]
        act = dataclasses.replace(
            config.input_activation, observer_or_fake_quant_ctr=ctr.with_args(eps=ACT_EPS)
        )
        config = dataclasses.replace(config, input_activation=act, output_activation=act)
    return quantizer.set_global(config)


def _to_litert(
    quantized: GraphModule, quantizer: Any, example: tuple[torch.Tensor], *, trained: bool = False
) -> bytes:
    """`trained`: the graph was switched to training mode (QAT), so its dropout and batch norm go back
    to their eval form here. A graph traced from an eval-mode module has them in that form already,
    and torchao's switch would only re-trace its patterns to find nothing (~0.25 s of a digits
    student's 1.6 s min-max export, same bytes)."""
    import litert_torch
    from litert_torch.quantize import quant_config
    from torchao.quantization.pt2e import move_exported_model_to_eval

    if trained:
        move_exported_model_to_eval(quantized)
    torch.nn.Module.train(quantized, False)  # clears the flag litert-torch warns about (the exported
    # module's own .eval() refuses on purpose)
    config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
    return bytes(litert_torch.convert(quantized, example, quant_config=config).model_content())


def _example(input_shape: tuple[int, ...], batch: int) -> tuple[torch.Tensor]:
    return (torch.zeros(batch, *input_shape),)


def _exported(
    student: EdgeStudent, input_shape: tuple[int, ...], batch: int, dynamic: bool = False
) -> GraphModule:
    """The student traced at `batch`, or for any batch size if `dynamic` (then `batch` must be > 1)."""
    module = TwoOutputs(copy.deepcopy(student)).eval()
    example = _example(input_shape, batch)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    graph = torch.export.export(module, example, dynamic_shapes=shapes).module()
    return graph


def float_bytes(student: EdgeStudent, input_shape: tuple[int, ...], batch: int = 1) -> bytes:
    """The student as a float32 LiteRT file."""
    with quiet():
        import litert_torch

        module = TwoOutputs(copy.deepcopy(student)).eval()
        return bytes(litert_torch.convert(module, _example(input_shape, batch)).model_content())


def ptq_bytes(student: EdgeStudent, calibration: FloatArray, recipe: Calibration, batch: int = 1) -> bytes:
    """Static int8 quantization calibrated on `calibration` as `recipe` says, as LiteRT bytes."""
    calib = calibration if recipe.samples is None else calibration[: recipe.samples]
    with quiet(), _one_thread():
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = _quantizer(recipe.observer)
        shape = calibration.shape[1:]
        prepared = quantize_pt2e.prepare_pt2e(_exported(student, shape, batch), quantizer)
        with torch.no_grad():  # the export has a fixed batch, so calibrate at that batch
            usable = len(calib) - len(calib) % batch
            for start in range(0, usable, batch):
                prepared(torch.from_numpy(calib[start : start + batch]))
        quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        return _to_litert(quantized, quantizer, _example(shape, batch))


def qat_bytes(
    student: EdgeStudent, calibration: FloatArray, config: QATConfig = QATConfig(), batch: int = 1
) -> tuple[EdgeStudent, bytes]:
    """Fine-tune a copy of `student` with int8 fake quantization, then convert it.

    The targets are the float student's own outputs on `calibration` (soft, plus its top-1 as a hard
    label), so no labels are needed. Returns the fine-tuned float student and its int8 LiteRT bytes.
    """
    x = torch.from_numpy(calibration)
    with torch.no_grad():
        soft = F.softmax(student.eval()(x) / config.temperature, dim=1)
    hard = soft.argmax(1)
    generator = torch.Generator().manual_seed(config.seed)
    with quiet(), _one_thread():
        from torchao.quantization.pt2e import disable_observer, move_exported_model_to_train, quantize_pt2e

        quantizer = _quantizer(None)
        # a dynamic batch: trained in mini-batches, converted at the export's fixed batch
        shape = calibration.shape[1:]
        exported = _exported(student, shape, config.batch, dynamic=True)
        prepared = quantize_pt2e.prepare_qat_pt2e(exported, quantizer)
        move_exported_model_to_train(prepared)
        params = [p for p in prepared.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        for epoch in range(config.epochs):
            if epoch == config.epochs - 1:  # settle the scales for the last pass over the data
                prepared.apply(disable_observer)
            for idx in torch.split(torch.randperm(len(x), generator=generator), config.batch):
                _, logits = prepared(x[idx])
                t = config.temperature
                kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft[idx], reduction="batchmean") * t * t
                loss = kd + F.cross_entropy(logits, hard[idx])
                optimizer.zero_grad()
                torch.autograd.backward(loss)
                optimizer.step()
        tuned = _float_weights(prepared, student)
        quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        return tuned, _to_litert(quantized, quantizer, _example(shape, batch), trained=True)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the caller's setting.

    The students are small (17k–25k parameters), run at batch 1 (calibration) or 32 (QAT): more
    threads only synchronise, and on busy cores each step then waits ~100x longer. One thread also makes the
    result independent of the host's thread setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _float_weights(prepared: GraphModule, student: EdgeStudent) -> EdgeStudent:
    """A copy of the student holding the fine-tuned float weights of the prepared graph."""
    state = {
        name.removeprefix("student."): value.detach().clone()
        for name, value in prepared.state_dict().items()
        if name.removeprefix("student.") in student.state_dict()
    }
    tuned = copy.deepcopy(student)
    tuned.load_state_dict(state)
    return tuned.eval()
