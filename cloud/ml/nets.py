"""The networks: a small CNN teacher (cloud model) and the student S = h∘f (edge model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetSpec:
    """Shapes shared by teacher and student: flat inputs of `side`×`side` pixels, `num_classes` outputs."""

    side: int = 8
    num_classes: int = 10
    hidden: int = 128
    feature_dim: int = 64

    @property
    def input_dim(self) -> int:
        """Length of a flat input."""
        return self.side * self.side


class Teacher(nn.Module):
    """The cloud model: two 3×3 convolutions, a pool and two dense layers (~150k parameters)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        pooled = 64 * (spec.side // 2) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(pooled, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, spec.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.conv(x.view(-1, 1, self.spec.side, self.spec.side)))
        return out


class Student(nn.Module):
    """The edge model: backbone f (two dense layers) → features → linear head h.

    `forward` returns logits; `features_and_logits` returns both, which is what the export emits.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = nn.Sequential(
            nn.Linear(spec.input_dim, spec.hidden),
            nn.ReLU(),
            nn.Linear(spec.hidden, spec.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.backbone(x))
        return out

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x), h(f(x)))."""
        feats = self.backbone(x)
        return feats, self.head(feats)


class TwoOutputs(nn.Module):
    """The student as exported: one input, outputs (features, logits) in that order."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.features_and_logits(x)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters())
