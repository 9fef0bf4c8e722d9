"""A manufacturer's own model family: a LeNet-5 style pair, named `examples.families.lenet:family`.

    diredi line create --cohort kitchen --data mnist-5k --family examples.families.lenet:family

The factory gets the shape of one sample (C×H×W for images) and the number of classes and returns
(teacher, student). The student keeps DiReDi's contract (docs/model-families.md): `features(x)` is
the backbone f, `head` one nn.Linear over its output, and `forward(x)` is `head(features(x))`. The
teacher is any classifier of the same inputs; it stays in the cloud and is never exported.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNetStudent(nn.Module):
    """Two 5×5 conv blocks and two dense layers → 84 features → linear head (~62k parameters on 28×28)."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
        )
        self.head = nn.Linear(84, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class WideTeacher(nn.Module):
    """The cloud model: a wider conv net of the same inputs (only its logits matter to DiReDi)."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def family(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The factory DiReDi calls: (teacher, student) for samples of `input_shape` (C×H×W, H and W of at
    least 12) and `num_classes` classes."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 12:
        raise ValueError(f"this family takes images C×H×W of at least 12×12, not {input_shape}")
    c, h, w = input_shape
    return WideTeacher(c, h, w, num_classes), LeNetStudent(c, h, w, num_classes)
