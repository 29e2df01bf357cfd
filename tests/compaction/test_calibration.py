"""``Calibration``: a moving factor of reported ÷ estimated tokens per model, and sampling."""

from __future__ import annotations

import itertools
import random

import pytest

from gateway.compaction import Calibration
from gateway.compaction.calibration import SAMPLE_EVERY, SAMPLED_CALLS


def test_an_unseen_model_has_factor_one() -> None:
    calibration = Calibration()
    assert calibration.factor("claude-sonnet-4-6") == 1.0
    assert calibration.factor(None) == 1.0
    assert calibration.to_json() == {}


def test_the_factor_converges_on_a_constant_ratio() -> None:
    calibration = Calibration()
    rng = random.Random(7)
    errors = []
    for _ in range(30):
        estimate = rng.randint(5_000, 150_000)
        calibration.observe("claude-sonnet-4-6", estimate, round(estimate * 1.3))
        errors.append(calibration.models["claude-sonnet-4-6"].error)
    assert calibration.factor("claude-sonnet-4-6") == pytest.approx(1.3, rel=0.01)
    # The first sample was 23% off (factor 1.0); the error shrinks towards 0 from there on.
    assert errors[0] == pytest.approx(0.3 / 1.3, rel=0.01)
    assert all(later <= earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 0.001
    assert calibration.models["claude-sonnet-4-6"].samples == 30


def test_the_factor_follows_noisy_samples_around_their_mean() -> None:
    calibration = Calibration()
    rng = random.Random(3)
    for _ in range(60):
        estimate = rng.randint(10_000, 100_000)
        calibration.observe("m", estimate, round(estimate * rng.uniform(1.15, 1.25)))
    assert calibration.factor("m") == pytest.approx(1.2, abs=0.04)
    assert calibration.models["m"].error < 0.1


def test_the_factor_moves_when_the_provider_changes() -> None:
    calibration = Calibration()
    for _ in range(20):
        calibration.observe("m", 10_000, 13_000)
    for _ in range(30):
        calibration.observe("m", 10_000, 10_000)
    assert calibration.factor("m") == pytest.approx(1.0, abs=0.01)


def test_the_first_sample_sets_the_factor() -> None:
    calibration = Calibration()
    calibration.observe("gpt-4o", 1000, 900)
    assert calibration.factor("gpt-4o") == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("estimate", "reported"),
    [
        (10_000, 0),
        (0, 10_000),
        (-5, 10_000),
        (10_000, -1),
        (10_000, 100),  # 0.01: a cached-context quirk
        (10_000, 2_000),  # 0.2: just below the floor
        (10_000, 41_000),  # 4.1: just above the ceiling
        (100, 1_000_000),
    ],
)
def test_absurd_ratios_and_zeros_are_ignored(estimate: int, reported: int) -> None:
    calibration = Calibration()
    calibration.observe("m", 10_000, 12_000)
    calibration.observe("m", estimate, reported)
    entry = calibration.models["m"]
    assert entry.factor == pytest.approx(1.2)
    assert entry.samples == 1
    assert (entry.last_estimate, entry.last_reported) == (10_000, 12_000)


def test_an_ignored_sample_of_a_new_model_leaves_nothing_behind() -> None:
    calibration = Calibration()
    calibration.observe("m", 1000, 0)
    calibration.observe("m", 1000, 100_000)
    assert calibration.factor("m") == 1.0
    assert calibration.to_json() == {}


def test_ratios_at_the_bounds_are_believed() -> None:
    calibration = Calibration()
    calibration.observe("low", 10_000, 2_500)
    calibration.observe("high", 10_000, 40_000)
    assert calibration.factor("low") == pytest.approx(0.25)
    assert calibration.factor("high") == pytest.approx(4.0)


def test_models_are_calibrated_apart() -> None:
    calibration = Calibration()
    calibration.observe("claude-sonnet-4-6", 1000, 1300)
    calibration.observe("gpt-4o", 1000, 1000)
    assert calibration.factor("claude-sonnet-4-6") == pytest.approx(1.3)
    assert calibration.factor("gpt-4o") == pytest.approx(1.0)
    assert calibration.factor("gpt-5") == 1.0


def sampled_calls(calibration: Calibration, model: str, calls: int) -> list[int]:
    """Call numbers (1-based) that were sampled, each sample observed as the gateway does."""
    sampled = []
    for call in range(1, calls + 1):
        if calibration.wants_sample(model):
            sampled.append(call)
            calibration.observe(model, 1000, 1250)
    return sampled


def test_the_first_twenty_calls_are_sampled_then_one_in_sixteen() -> None:
    assert (SAMPLED_CALLS, SAMPLE_EVERY) == (20, 16)
    calibration = Calibration()
    sampled = sampled_calls(calibration, "m", 100)
    assert sampled[:20] == list(range(1, 21))
    assert sampled[20:] == [32, 48, 64, 80, 96]
    assert calibration.models["m"].samples == 25
    assert calibration.models["m"].calls == 100


def test_calls_are_sampled_until_twenty_samples_were_believed() -> None:
    """A call whose sample was thrown out (no usage, an absurd ratio) does not count."""
    calibration = Calibration()
    for _ in range(40):
        assert calibration.wants_sample("m")
        calibration.observe("m", 1000, 0)
    assert calibration.models["m"].samples == 0


def test_sampling_is_counted_per_model() -> None:
    calibration = Calibration()
    sampled_calls(calibration, "a", 50)
    assert calibration.wants_sample("b")
    assert calibration.models["b"].calls == 1


def test_to_json_shape() -> None:
    calibration = Calibration()
    calibration.observe("gpt-4o", 10_000, 10_050)
    calibration.observe("claude-sonnet-4-6", 3, 4)
    calibration.wants_sample("never-observed")
    data = calibration.to_json()
    assert list(data) == ["claude-sonnet-4-6", "gpt-4o"]  # sorted, sampled models only
    assert data["gpt-4o"] == {
        "factor": 1.005,
        "error": 0.005,
        "samples": 1,
        "last_estimate": 10_000,
        "last_reported": 10_050,
    }
    assert data["claude-sonnet-4-6"]["factor"] == 1.3333  # rounded to four places


def test_a_missing_model_is_calibrated_under_the_empty_name() -> None:
    calibration = Calibration()
    calibration.observe(None, 1000, 1500)
    assert calibration.factor(None) == pytest.approx(1.5)
    assert calibration.factor("") == pytest.approx(1.5)
    assert "" in calibration.to_json()
