"""device_firmware_py.privacy: zCDP conversions, the Gaussian mechanism, the accountant, DP reports."""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_firmware_py.exceptions import PrivacyBudgetExhaustedError, PrivacyStateError
from device_firmware_py.privacy import (
    MAP_SENSITIVITY,
    DPConfig,
    PrivacyAccountant,
    epsilon_from_rho,
    privatize,
    rho_from_epsilon,
)
from device_firmware_py.rd import extract_knowledge
from device_firmware_py.runtime import FloatArray, Int8Model
from wire import KnowledgeReport

if TYPE_CHECKING:
    from cloud.ml.data import ScenarioData, Split

epsilons = st.floats(min_value=0.1, max_value=20.0)
deltas = st.floats(min_value=1e-9, max_value=1e-2)


def head_delta(norm: float, shape: tuple[int, int] = (3, 4)) -> tuple[FloatArray, FloatArray]:
    """A fixed (ΔW, Δb) whose joint L2 norm is `norm`."""
    rng = np.random.default_rng(11)
    flat = rng.normal(size=shape[0] * shape[1] + shape[0])
    flat *= norm / np.linalg.norm(flat)
    w = flat[: shape[0] * shape[1]].reshape(shape).astype(np.float32)
    b = flat[shape[0] * shape[1] :].astype(np.float32)
    return w, b


def mean_of_draws(
    w: FloatArray, b: FloatArray, config: DPConfig, draws: int
) -> tuple[FloatArray, FloatArray]:
    """The mean privatized (ΔW, Δb) over many independent draws."""
    rng = np.random.default_rng(12)
    counts = np.zeros((3, 3))
    outs = [privatize(counts, w, b, config, rng)[1:] for _ in range(draws)]
    return np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)


def dana_pool(data: ScenarioData) -> Split:
    user = data.users[0]
    assert user.spec.id == "dana"
    return user.device_train[0]


@given(epsilon=epsilons, delta=deltas)
def test_epsilon_from_rho_inverts_rho_from_epsilon(epsilon: float, delta: float) -> None:
    # Execute
    rho = rho_from_epsilon(epsilon, delta)

    # Assert
    assert rho > 0
    assert epsilon_from_rho(rho, delta) == pytest.approx(epsilon, rel=1e-9)


@given(epsilon=epsilons, delta=deltas)
def test_rho_from_epsilon_inverts_epsilon_from_rho(epsilon: float, delta: float) -> None:
    # Prepare
    rho = rho_from_epsilon(epsilon, delta)

    # Execute
    back = rho_from_epsilon(epsilon_from_rho(rho, delta), delta)

    # Assert
    assert back == pytest.approx(rho, rel=1e-9)


@given(epsilon=epsilons, delta=deltas)
def test_a_larger_epsilon_buys_a_larger_rho(epsilon: float, delta: float) -> None:
    # Execute / Assert
    assert rho_from_epsilon(epsilon * 1.5, delta) > rho_from_epsilon(epsilon, delta)


def test_epsilon_from_rho_matches_the_zcdp_conversion() -> None:
    # Prepare: ρ = 0.5, δ = e⁻⁸ → ε = 0.5 + 2·√(0.5·8) = 4.5.
    rho, delta = 0.5, math.exp(-8.0)

    # Execute / Assert
    assert epsilon_from_rho(rho, delta) == pytest.approx(4.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": math.nan},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": -1e-5},
        {"delta": math.nan},
        {"clip_norm": 0.0},
        {"clip_norm": -1.0},
        {"map_share": 0.0},
        {"map_share": -0.5},
        {"map_share": 1.5},
        {"map_share": math.nan},
    ],
)
def test_dp_config_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        DPConfig(**kwargs)


def test_dp_config_rejects_an_infinite_epsilon() -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        DPConfig(epsilon=math.inf)


@pytest.mark.parametrize(
    ("epsilon", "delta", "map_share"), [(4.0, 1e-5, 1.0), (1.0, 1e-6, 0.5), (10.0, 1e-3, 0.9)]
)
def test_sigma_map_formula(epsilon: float, delta: float, map_share: float) -> None:
    # Prepare
    config = DPConfig(epsilon=epsilon, delta=delta, map_share=map_share)
    rho = rho_from_epsilon(epsilon, delta)

    # Execute / Assert
    assert config.rho == pytest.approx(rho)
    assert config.sigma_map == pytest.approx(math.sqrt(2.0) / math.sqrt(2.0 * rho * map_share))


@pytest.mark.parametrize("map_share", [0.1, 0.5, 0.9])
def test_the_two_parts_together_cost_exactly_rho(map_share: float) -> None:
    # Prepare
    config = DPConfig(epsilon=3.0, clip_norm=2.5, map_share=map_share)

    # Execute: a Gaussian mechanism of sensitivity s and noise σ costs s² / (2σ²).
    map_cost = MAP_SENSITIVITY**2 / (2 * config.sigma_map**2)
    delta_cost = (2 * config.clip_norm) ** 2 / (2 * config.sigma_delta**2)

    # Assert
    assert map_cost + delta_cost == pytest.approx(config.rho)


def test_map_share_one_zeroes_the_head_delta() -> None:
    # Prepare
    config = DPConfig(epsilon=4.0, map_share=1.0)
    w, b = head_delta(norm=5.0)

    # Execute
    _, noisy_w, noisy_b = privatize(np.zeros((3, 3)), w, b, config, np.random.default_rng(0))

    # Assert
    assert math.isinf(config.sigma_delta)
    assert noisy_w.shape == w.shape and noisy_b.shape == b.shape
    assert not noisy_w.any() and not noisy_b.any()


def test_map_noise_has_sigma_map() -> None:
    # Prepare
    config = DPConfig(epsilon=2.0)
    counts = np.full((200, 200), 7.0)

    # Execute
    noisy, _, _ = privatize(counts, *head_delta(1.0), config, np.random.default_rng(1))

    # Assert
    noise = noisy.astype(np.float64) - counts
    assert noisy.dtype == np.float32
    assert abs(noise.mean()) < 0.05 * config.sigma_map
    assert noise.std() == pytest.approx(config.sigma_map, rel=0.03)


def test_head_delta_is_clipped_to_the_clip_norm_before_the_noise() -> None:
    # Prepare: ‖Δ‖ = 10 and C = 1; the noise averages out over many draws, the clipping does not.
    config = DPConfig(epsilon=50.0, clip_norm=1.0, map_share=0.5)
    w, b = head_delta(norm=10.0)

    # Execute
    mean_w, mean_b = mean_of_draws(w, b, config, draws=2000)

    # Assert
    np.testing.assert_allclose(mean_w, w / 10.0, atol=0.05)
    np.testing.assert_allclose(mean_b, b / 10.0, atol=0.05)


def test_head_delta_within_the_clip_norm_is_not_rescaled() -> None:
    # Prepare
    config = DPConfig(epsilon=50.0, clip_norm=1.0, map_share=0.5)
    w, b = head_delta(norm=0.5)

    # Execute
    mean_w, mean_b = mean_of_draws(w, b, config, draws=2000)

    # Assert
    np.testing.assert_allclose(mean_w, w, atol=0.05)
    np.testing.assert_allclose(mean_b, b, atol=0.05)


def test_head_delta_noise_has_sigma_delta() -> None:
    # Prepare
    config = DPConfig(epsilon=4.0, clip_norm=1.0, map_share=0.5)
    w, b = np.zeros((100, 100), np.float32), np.zeros(100, np.float32)

    # Execute
    _, noisy_w, noisy_b = privatize(np.zeros((3, 3)), w, b, config, np.random.default_rng(2))

    # Assert
    noise = np.concatenate([noisy_w.ravel(), noisy_b])
    assert noise.std() == pytest.approx(config.sigma_delta, rel=0.03)


def test_accountant_charges_and_reports_epsilon() -> None:
    # Prepare
    accountant = PrivacyAccountant(budget_epsilon=8.0, delta=1e-5)
    rho = rho_from_epsilon(4.0, 1e-5)

    # Execute
    first = accountant.charge(rho)
    second = accountant.charge(rho)

    # Assert
    assert first == pytest.approx(4.0)
    assert second == pytest.approx(epsilon_from_rho(2 * rho, 1e-5))
    assert accountant.spent_rho == pytest.approx(2 * rho)
    assert accountant.spent_epsilon == pytest.approx(second)


def test_fresh_accountant_has_spent_nothing() -> None:
    # Execute
    accountant = PrivacyAccountant(budget_epsilon=8.0, delta=1e-5)

    # Assert
    assert accountant.spent_rho == 0.0
    assert accountant.spent_epsilon == 0.0


def test_accountant_persists_owner_only_and_reloads(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "privacy.json"
    accountant = PrivacyAccountant(budget_epsilon=8.0, delta=1e-5, path=path)

    # Execute
    accountant.charge(0.25)
    accountant.charge(0.5)
    reloaded = PrivacyAccountant(budget_epsilon=8.0, delta=1e-5, path=path)

    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["spent_rho"] == pytest.approx(0.75)
    assert reloaded.spent_rho == pytest.approx(0.75)
    assert reloaded.spent_epsilon == pytest.approx(accountant.spent_epsilon)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json"]  # no temporary file left


def test_reloaded_accountant_keeps_charging_from_where_it_was(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "privacy.json"
    PrivacyAccountant(budget_epsilon=8.0, delta=1e-5, path=path).charge(0.25)

    # Execute
    PrivacyAccountant(budget_epsilon=8.0, delta=1e-5, path=path).charge(0.25)

    # Assert
    assert PrivacyAccountant(budget_epsilon=8.0, delta=1e-5, path=path).spent_rho == pytest.approx(0.5)


def test_over_budget_raises_without_spending(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "privacy.json"
    accountant = PrivacyAccountant(budget_epsilon=4.0, delta=1e-5, path=path)
    accountant.charge(0.2)
    saved = path.read_bytes()

    # Execute / Assert
    with pytest.raises(PrivacyBudgetExhaustedError):
        accountant.charge(rho_from_epsilon(4.0, 1e-5))
    assert accountant.spent_rho == pytest.approx(0.2)
    assert path.read_bytes() == saved


def test_charge_up_to_exactly_the_budget_is_allowed() -> None:
    # Prepare
    accountant = PrivacyAccountant(budget_epsilon=4.0, delta=1e-5)

    # Execute
    spent = accountant.charge(rho_from_epsilon(4.0, 1e-5) * (1 - 1e-12))

    # Assert
    assert spent <= 4.0


@pytest.mark.parametrize(("budget", "delta"), [(0.0, 1e-5), (-1.0, 1e-5), (8.0, 0.0), (8.0, 1.0)])
def test_accountant_rejects_bad_parameters(budget: float, delta: float) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        PrivacyAccountant(budget_epsilon=budget, delta=delta)


def test_dp_reports_until_the_budget_refuses(
    base_model: Int8Model, small_data: ScenarioData, tmp_path: Path
) -> None:
    # Prepare: ε = 4 per report, budget 8, δ = 1e-5. zCDP composes in ρ, so k reports cost
    # ε(kρ) = kρ + 2√(kρ·ln 1e5) with ρ ≈ 0.297: 4.00, 5.82, 7.30, then 8.58 > 8 is refused.
    pool = dana_pool(small_data)
    dp = DPConfig(epsilon=4.0, delta=1e-5)
    accountant = PrivacyAccountant(budget_epsilon=8.0, delta=1e-5, path=tmp_path / "privacy.json")
    reports: list[KnowledgeReport] = []

    # Execute
    with pytest.raises(PrivacyBudgetExhaustedError):
        for seed in range(10):
            reports.append(
                extract_knowledge(
                    base_model, pool.x, pool.y, device_id="dev-1", dp=dp, accountant=accountant, seed=seed
                )
            )

    # Assert
    assert len(reports) == 3
    spent = [r.privacy.spent_epsilon for r in reports if r.privacy is not None]
    assert spent == pytest.approx([epsilon_from_rho(k * dp.rho, 1e-5) for k in (1, 2, 3)])
    assert spent[0] == pytest.approx(4.0)
    assert spent[0] < spent[1] < spent[2] <= 8.0
    assert accountant.spent_rho == pytest.approx(3 * dp.rho)  # the refused report spent nothing


def test_dp_report_carries_its_privacy_statement(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)
    dp = DPConfig(epsilon=4.0, delta=1e-5)

    # Execute
    report = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1", dp=dp)

    # Assert
    privacy = report.privacy
    assert privacy is not None
    assert privacy.epsilon == 4.0
    assert privacy.delta == 1e-5
    assert privacy.rho == pytest.approx(dp.rho)
    assert privacy.sigma_map == pytest.approx(dp.sigma_map)
    assert privacy.sigma_delta is None  # map_share = 1: Δ is not sent
    assert privacy.spent_epsilon == 4.0
    assert report.preference_map.dtype == "float32"
    assert not report.delta_weight.to_numpy().any() and not report.delta_bias.to_numpy().any()
    assert not np.array_equal(report.counts(), np.round(report.counts()))  # the counts are noisy
    assert KnowledgeReport.from_bytes(report.to_bytes()) == report


def test_dp_report_with_a_head_delta_share(base_model: Int8Model, small_data: ScenarioData) -> None:
    # Prepare
    pool = dana_pool(small_data)
    dp = DPConfig(epsilon=8.0, delta=1e-5, clip_norm=1.0, map_share=0.5)

    # Execute
    report = extract_knowledge(base_model, pool.x, pool.y, device_id="dev-1", dp=dp)

    # Assert
    assert report.privacy is not None
    assert report.privacy.sigma_delta == pytest.approx(dp.sigma_delta)
    assert report.privacy.clip_norm == 1.0
    assert np.linalg.norm(report.delta_weight.to_numpy()) > 0
    assert KnowledgeReport.from_bytes(report.to_bytes()) == report


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"delta": 1e-5}',
        '{"spent_rho": -1, "delta": 1e-5}',
        '{"spent_rho": "NaN", "delta": 1e-5}',
    ],
    ids=["not-json", "missing-rho", "negative-rho", "nan-rho"],
)
def test_a_corrupt_privacy_state_is_refused(content: str, tmp_path: Path) -> None:
    # Prepare
    state = tmp_path / "privacy.json"
    state.write_text(content)

    # Execute / Assert: refusing is safe; starting from zero would forget what was spent
    with pytest.raises(PrivacyStateError):
        PrivacyAccountant(8.0, 1e-5, state)


def test_a_privacy_state_kept_for_another_delta_is_refused(tmp_path: Path) -> None:
    # Prepare
    state = tmp_path / "privacy.json"
    PrivacyAccountant(8.0, 1e-5, state).charge(0.1)

    # Execute / Assert
    with pytest.raises(PrivacyStateError, match="δ"):
        PrivacyAccountant(8.0, 1e-6, state)


def test_a_nan_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        PrivacyAccountant(math.nan, 1e-5)
