"""What a device reports of itself: the window of inferences since its last status, and the status
message made of it (latencies, confidence, classes, accuracy on known labels, CPU, memory, temperature)."""

from __future__ import annotations

import math
import os
import resource
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wire.messages import Status


def cpu_seconds() -> float:
    """CPU time this process has used (user and system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Window:
    """What the daemon measured since its last status."""

    latencies_ms: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    classes: Counter[int] = field(default_factory=Counter)
    correct: int = 0
    known: int = 0

    def record(self, latency_ms: float, confidence: float, predicted: int, label: int | None) -> None:
        """One inference: its latency, its confidence, the class decided and the label if known."""
        self.latencies_ms.append(latency_ms)
        self.confidences.append(confidence)
        self.classes[predicted] += 1
        if label is not None:
            self.known += 1
            self.correct += int(predicted == label)

    def status(
        self,
        device_id: str,
        *,
        model_id: str | None,
        uptime_s: float,
        inference_count: int,
        labelled_count: int | None,
        cpu_percent: float | None,
        trust_version: int,
    ) -> Status:
        """The status message of this window, with the process's memory and the board's temperature."""
        return Status(
            device_id=device_id,
            model_id=model_id,
            uptime_s=uptime_s,
            inference_count=inference_count,
            latency_p50_ms=_percentile(self.latencies_ms, 50),
            latency_p95_ms=_percentile(self.latencies_ms, 95),
            mean_confidence=float(np.mean(self.confidences)) if self.confidences else None,
            class_histogram={str(c): n for c, n in self.classes.most_common(256)},
            labelled_count=min(labelled_count, 2**31 - 1) if labelled_count is not None else None,
            accuracy=self.correct / self.known if self.known else None,
            cpu_percent=min(cpu_percent, 25_600.0)
            if cpu_percent is not None and math.isfinite(cpu_percent)
            else None,
            mem_bytes=_rss_bytes(),
            temp_c=_temperature(),
            trust_version=trust_version,
        )


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _temperature() -> float | None:
    """The SoC's temperature on a Raspberry Pi (and most Linux boards), if the kernel exposes it."""
    try:
        celsius = int(Path("/sys/class/thermal/thermal_zone0/temp").read_text().strip()) / 1000
    except (OSError, ValueError):
        return None
    return celsius if -100 <= celsius <= 200 else None


def _rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
