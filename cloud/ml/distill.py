"""Training: the teacher on hard labels, KD into the student, and fine-tuning towards soft targets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from cloud.ml.data import Split
from cloud.ml.nets import image_shape

Progress = Callable[[int, int], None]  # (done epochs, total epochs)
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of one training run."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    # KD only: each batch also gets a shifted, noisy copy, labelled by the teacher on the fly. More
    # transfer data makes the student follow the teacher more closely on inputs it never saw.
    augment: bool = False
    augment_noise: float = 0.03  # Gaussian noise on the scaled inputs (0.03 ≈ half a digits pixel level)
    # At least this many optimiser steps: a small dataset gets more epochs than `epochs` says.
    min_steps: int = 0

    def epochs_for(self, n: int, mix: int = 0) -> int:
        """The epochs of a run over `n` samples (batches half as large when `mix`ed with a second pool)."""
        per_batch = max(1, self.batch_size // 2) if mix else self.batch_size
        steps = -(-n // per_batch)
        return max(self.epochs, -(-self.min_steps // max(1, steps)))


@dataclass(frozen=True)
class KDConfig:
    """KD loss L = α·CE(y, S(x)) + (1−α)·τ²·KL(σ(T/τ) ‖ σ(S/τ)) of DESIGN §3 step 1."""

    alpha: float = 0.3
    tau: float = 4.0


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch for a run and return a generator for its batch order."""
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def augment(x: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of a batch of images (C×H×W, or flat square ones) shifted by up to one pixel each way,
    plus Gaussian noise; other vectors get the noise only."""
    shape = image_shape(tuple(x.shape[1:]))
    shifted = x
    if shape is not None:
        _, h, w = shape
        padded = F.pad(x.reshape(-1, *shape), (1, 1, 1, 1))
        dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
        shifted = padded[:, :, dy : dy + h, dx : dx + w].reshape(x.shape)
    return shifted + noise * torch.randn(shifted.shape, generator=gen)


def _batches(n: int, batch: int, gen: torch.Generator, mix: int = 0) -> list[torch.Tensor]:
    """Index batches over n samples; with `mix` > 0, each batch gets as many indices from a second pool.

    Indices of the second pool are offset by n, so a batch is half from each pool.
    """
    order = torch.randperm(n, generator=gen)
    if not mix:
        return list(torch.split(order, batch))
    half = max(1, batch // 2)
    chunks = torch.split(order, half)
    extra = torch.randint(0, mix, (len(chunks), half), generator=gen) + n
    return [torch.cat([c, e[: len(c)]]) for c, e in zip(chunks, extra, strict=True)]


@contextmanager
def channels_last(*modules: nn.Module) -> Iterator[None]:
    """Convolution weights in channels-last order while training: the convolutions' outputs follow
    it, and PyTorch's CPU max pooling is an order of magnitude faster on that layout than on NCHW (a
    3×3 conv net's training step on 8×8 or 28×28 images took a quarter to a half less). The weights
    go back to the default layout afterwards, for saving and export."""
    _set_layout(modules, torch.channels_last)
    try:
        yield
    finally:
        _set_layout(modules, torch.contiguous_format)


def _set_layout(modules: tuple[nn.Module, ...], layout: torch.memory_format) -> None:
    for module in modules:
        for weight in module.parameters():
            if weight.dim() == 4:  # a 2-D convolution's kernels
                weight.data = weight.data.to(memory_format=layout)


def _fit(
    model: nn.Module,
    n: int,
    step: Callable[[torch.Tensor], torch.Tensor],
    config: TrainConfig,
    gen: torch.Generator,
    progress: Progress | None,
    mix: int = 0,
) -> None:
    # fused: one kernel for every parameter's update; the per-tensor loop was a fifth of a small
    # model's step on CPU.
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    model.train()
    epochs = config.epochs_for(n, mix)
    for epoch in range(epochs):
        for idx in _batches(n, config.batch_size, gen, mix):
            opt.zero_grad()
            torch.autograd.backward(step(idx))
            opt.step()
        if progress:
            progress(epoch + 1, epochs)
    model.eval()


def train_classifier(
    model: M,
    data: Split,
    config: TrainConfig,
    *,
    seed: int,
    extra: Split | None = None,
    progress: Progress | None = None,
) -> M:
    """Train `model` on hard labels (CE); with `extra`, half of every batch comes from it."""
    gen = seed_everything(seed)
    x = torch.from_numpy(np.concatenate([data.x, extra.x]) if extra else data.x)
    y = torch.from_numpy(np.concatenate([data.y, extra.y]) if extra else data.y)

    def step(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x[idx]), y[idx])

    with channels_last(model):
        _fit(model, len(data), step, config, gen, progress, mix=len(extra) if extra else 0)
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, x: npt.NDArray[np.float32], tau: float = 1.0) -> npt.NDArray[np.float32]:
    """Softmax of the model's logits at temperature `tau`."""
    model.eval()
    out: npt.NDArray[np.float32] = F.softmax(model(torch.from_numpy(x)) / tau, dim=1).numpy()
    return out


def distill(
    student: M,
    teacher: nn.Module,
    data: Split,
    config: TrainConfig,
    kd: KDConfig,
    *,
    seed: int,
    weights: npt.NDArray[np.float32] | None = None,
    extra: Split | None = None,
    progress: Progress | None = None,
) -> M:
    """KD of `teacher` into `student` (trained in place) on `data` (+ `extra`, half of every batch).

    `data.y` are the hard labels of the α·CE term; `weights` weight each sample of `data`.
    """
    gen = seed_everything(seed)
    x = torch.from_numpy(np.concatenate([data.x, extra.x]) if extra else data.x)
    y = torch.from_numpy(np.concatenate([data.y, extra.y]) if extra else data.y)
    w = np.ones(len(x), dtype=np.float32)
    if weights is not None:
        w[: len(data)] = weights
    wt = torch.from_numpy(w)
    teacher.eval()

    def step(idx: torch.Tensor) -> torch.Tensor:
        xb, yb, pb, wb = x[idx], y[idx], soft[idx], wt[idx]
        if config.augment:
            xa = augment(xb, config.augment_noise, gen)
            with torch.no_grad():
                pa = F.softmax(teacher(xa) / kd.tau, dim=1)
            xb, yb, pb, wb = (torch.cat(pair) for pair in ((xb, xa), (yb, yb), (pb, pa), (wb, wb)))
        logits = student(xb)
        ce = F.cross_entropy(logits, yb, reduction="none")
        logq = F.log_softmax(logits / kd.tau, dim=1)
        kl = (pb * (torch.log(pb.clamp_min(1e-8)) - logq)).sum(dim=1)
        loss = kd.alpha * ce + (1 - kd.alpha) * kd.tau**2 * kl
        return (wb * loss).sum() / wb.sum()

    with channels_last(student, teacher):
        with torch.no_grad():
            soft = F.softmax(teacher(x) / kd.tau, dim=1)
        _fit(student, len(data), step, config, gen, progress, mix=len(extra) if extra else 0)
    return student
