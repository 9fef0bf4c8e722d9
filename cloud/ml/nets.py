"""The built-in networks: an MLP pair for vectors, a conv pair for images (docs/model-families.md).

Every student is S = h∘f: `features(x)` is f, `head` is h, one linear layer over the features, and
`forward(x)` is `head(features(x))`. That is the whole contract DiReDi needs of an edge model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class EdgeStudent(nn.Module):
    """What a student exposes: `features(x)` (N×D) and `head`, a linear layer D → C."""

    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(channels, height, width) of a sample: itself if it is C×H×W, a square flat vector as one
    channel (digits' 64 values are an 8×8 image), None if it is neither."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        return c, h, w
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side == input_shape[0]:
            return 1, side, side
    return None


class Teacher(nn.Module):
    """The MLP family's cloud model: two 3×3 convolutions, a pool and two dense layers (~150k
    parameters on 8×8 inputs); a flat input is read as the square image it is."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        shape = image_shape(input_shape)
        if shape is None:
            raise ValueError(f"the teacher takes images or square flat inputs, not {input_shape}")
        self.image = shape
        c, h, w = shape
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (h // 2) * (w // 2), 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.conv(x.reshape(-1, *self.image)))
        return out


class Student(EdgeStudent):
    """The MLP family's edge model: two dense layers → 64 features → linear head (~17k parameters on
    digits). An input of any shape is flattened first."""

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128, feature_dim: int = 64
    ):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Linear(hidden, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x.flatten(1) if x.dim() > 2 else x)
        return out


class ConvTeacher(nn.Module):
    """The conv family's cloud model: two conv blocks and two dense layers (~420k parameters on 28×28)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        shape = image_shape(input_shape)
        if shape is None or len(input_shape) != 3:
            raise ValueError(f"the conv family takes images of shape C×H×W, not {input_shape}")
        c, h, w = shape
        self.conv = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.conv(x))
        return out


class ConvStudent(EdgeStudent):
    """The conv family's edge model: three conv blocks → global average pool → 64 features → linear
    head (~24k parameters)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"the conv family takes images of shape C×H×W, not {input_shape}")
        c = input_shape[0]
        self.backbone = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out


def mlp_family(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, EdgeStudent]:
    """The MLP pair: for vectors (digits) and small images."""
    return Teacher(input_shape, num_classes), Student(input_shape, num_classes)


def conv_family(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, EdgeStudent]:
    """The conv pair: for images C×H×W."""
    return ConvTeacher(input_shape, num_classes), ConvStudent(input_shape, num_classes)


class TwoOutputs(nn.Module):
    """The student as exported: one input, outputs (features, logits) in that order."""

    def __init__(self, student: EdgeStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.student.features(x)
        return feats, self.student.head(feats)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters())
