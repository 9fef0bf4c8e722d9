"""Local differential privacy for knowledge reports: the Gaussian mechanism under zCDP, and a budget.

Unit of privacy: one labelled sample (neighbouring private stores differ by replacing one sample).
- Preference map: one sample adds one count to one cell, so replacing it moves one count: L2
  sensitivity √2. Gaussian noise N(0, σ_map²) on every cell.
- Head delta: Δ = [ΔW | Δb] is clipped to ‖Δ‖₂ ≤ C, so replacing any sample (indeed the whole store)
  moves it by at most 2C. Gaussian noise N(0, σ_Δ²) on every coordinate.
A Gaussian mechanism with sensitivity s and noise σ is ρ-zCDP with ρ = s² / (2σ²) (Bun & Steinke
2016); ρ adds up over the two parts and over every report a device sends, and ρ-zCDP implies
(ρ + 2·sqrt(ρ·ln(1/δ)), δ)-DP. That conversion is the accountant; the budget caps its ε.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_firmware_py.exceptions import PrivacyBudgetExhaustedError, PrivacyStateError

MAP_SENSITIVITY = math.sqrt(2.0)


def epsilon_from_rho(rho: float, delta: float) -> float:
    """(ε, δ)-DP implied by ρ-zCDP."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def rho_from_epsilon(epsilon: float, delta: float) -> float:
    """The largest ρ whose zCDP → (ε, δ) conversion stays within `epsilon` (inverse of the above)."""
    log_term = math.log(1.0 / delta)
    root = -math.sqrt(log_term) + math.sqrt(log_term + epsilon)
    return root * root


@dataclass(frozen=True)
class DPConfig:
    """Per-report privacy: target (ε, δ), the clip norm C of Δ, and the share of ρ spent on the map.

    With `map_share` = 1 the head delta is not sent (zeros, no privacy cost): under a tight ε its
    noise would swamp it, while the map keeps its signal at count level.
    """

    epsilon: float = 4.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    map_share: float = 1.0

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.epsilon, self.delta, self.clip_norm, self.map_share))
        if not (finite and self.epsilon > 0 and 0 < self.delta < 1 and self.clip_norm > 0):
            raise ValueError("DP needs a finite epsilon > 0, 0 < delta < 1 and a finite clip_norm > 0")
        if not 0 < self.map_share <= 1:
            raise ValueError("map_share must be in (0, 1]")

    @property
    def rho(self) -> float:
        """The zCDP cost of one report."""
        return rho_from_epsilon(self.epsilon, self.delta)

    @property
    def sigma_map(self) -> float:
        """Noise on each map cell."""
        return MAP_SENSITIVITY / math.sqrt(2.0 * self.rho * self.map_share)

    @property
    def sigma_delta(self) -> float:
        """Noise on each head-delta coordinate (infinite when Δ is not sent)."""
        share = 1.0 - self.map_share
        return math.inf if share <= 0 else 2.0 * self.clip_norm / math.sqrt(2.0 * self.rho * share)


def privatize(
    counts: npt.NDArray[np.float64],
    delta_w: npt.NDArray[np.float32],
    delta_b: npt.NDArray[np.float32],
    config: DPConfig,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Noisy (map, ΔW, Δb) under `config`; Δ is clipped to C first, or zeroed when not sent."""
    noisy_map = counts + rng.normal(0.0, config.sigma_map, size=counts.shape)
    if math.isinf(config.sigma_delta):
        return noisy_map.astype(np.float32), np.zeros_like(delta_w), np.zeros_like(delta_b)
    flat = np.concatenate([delta_w.ravel(), delta_b.ravel()]).astype(np.float64)
    flat *= min(1.0, config.clip_norm / max(float(np.linalg.norm(flat)), 1e-12))
    flat += rng.normal(0.0, config.sigma_delta, size=flat.shape)
    w = flat[: delta_w.size].reshape(delta_w.shape).astype(np.float32)
    b = flat[delta_w.size :].astype(np.float32)
    return noisy_map.astype(np.float32), w, b


class PrivacyAccountant:
    """Tracks the ρ a device has spent and refuses a report that would exceed its ε budget.

    With a `path`, the spent ρ is kept in a small JSON file (owner-only) so it survives restarts.
    """

    def __init__(self, budget_epsilon: float, delta: float, path: Path | None = None) -> None:
        if not (math.isfinite(budget_epsilon) and budget_epsilon > 0 and 0 < delta < 1):
            raise ValueError("budget_epsilon must be finite and > 0, and 0 < delta < 1")
        self.budget_epsilon = budget_epsilon
        self.delta = delta
        self._path = path
        self.spent_rho = 0.0
        if path is not None and path.exists():
            self.spent_rho = self._load(path, delta)

    @staticmethod
    def _load(path: Path, delta: float) -> float:
        """The ρ stored at `path`; PrivacyStateError if it is unreadable or for another δ."""
        try:
            state = json.loads(path.read_text())
            spent, stored_delta = float(state["spent_rho"]), float(state["delta"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyStateError(f"privacy state {path} is unreadable: {exc}") from None
        if not (math.isfinite(spent) and spent >= 0):
            raise PrivacyStateError(f"privacy state {path} holds an invalid spent ρ {spent}")
        if stored_delta != delta:
            raise PrivacyStateError(f"privacy state {path} was kept for δ={stored_delta}, not {delta}")
        return spent

    @property
    def spent_epsilon(self) -> float:
        """ε spent so far at this accountant's δ."""
        return epsilon_from_rho(self.spent_rho, self.delta) if self.spent_rho > 0 else 0.0

    def charge(self, rho: float) -> float:
        """Spend `rho` and return the new total ε; raise if it would exceed the budget."""
        total = self.spent_rho + rho
        eps = epsilon_from_rho(total, self.delta)
        if eps > self.budget_epsilon:
            raise PrivacyBudgetExhaustedError(
                f"a report would bring ε to {eps:.3f}, above the budget of {self.budget_epsilon:.3f}"
            )
        self.spent_rho = total
        if self._path is not None:
            tmp = self._path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"spent_rho": total, "delta": self.delta}, fh)
            os.replace(tmp, self._path)
        return eps
