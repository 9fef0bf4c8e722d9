"""Model families defined in a test module, named by import path (`tests.cloud.families:<factory>`):
one that keeps the contract, and one for each way a factory can break it."""

from __future__ import annotations

import torch
from torch import nn


class TinyStudent(nn.Module):
    """A conv student of a few hundred parameters: conv → pool → conv → global pool → 16 features."""

    def __init__(self, channels: int, num_classes: int, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = head if head is not None else nn.Linear(16, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class TinyTeacher(nn.Module):
    def __init__(self, channels: int, height: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 2) * (width // 2), 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def tiny(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    """A family that keeps the contract."""
    c, h, w = input_shape
    return TinyTeacher(c, h, w, num_classes), TinyStudent(c, num_classes)


def one_module(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Returns the student alone."""
    return TinyStudent(input_shape[0], num_classes)


def two_layer_head(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The student's head is not one linear layer."""
    c, h, w = input_shape
    head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, num_classes))
    return TinyTeacher(c, h, w, num_classes), TinyStudent(c, num_classes, head)


class Shortcut(TinyStudent):
    """forward(x) is not head(features(x)): it adds a term the features do not carry."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x.mean()


def shortcut(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    c, h, w = input_shape
    return TinyTeacher(c, h, w, num_classes), Shortcut(c, num_classes)


class Normalized(TinyStudent):
    """Its features go through a LayerNorm, which the int8 converter leaves in float."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(channels, num_classes)
        self.norm = nn.LayerNorm(16)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(self.backbone(x))
        return out


def float_only(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    c, h, w = input_shape
    return TinyTeacher(c, h, w, num_classes), Normalized(c, num_classes)


def broken(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    raise RuntimeError("the factory's own bug")


class Wide(TinyStudent):
    """2,048 features: its float head alone is larger than a DesiredModel document may be."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(channels, num_classes, nn.Linear(2048, num_classes))
        self.widen = nn.Linear(16, 2048)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.relu(self.widen(self.backbone(x)))
        return out


def wide(input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    c, h, w = input_shape
    return TinyTeacher(c, h, w, num_classes), Wide(c, num_classes)
