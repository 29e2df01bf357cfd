"""How far the gateway's token estimate is from what each provider counts, per model.

tiktoken is exact for OpenAI's models and an estimate for everyone else (Anthropic's tokenizer
counts the same text as more tokens). Every call whose input was estimated and whose usage the
provider reported is a sample; the factor is a moving average of reported ÷ estimated, and the
error how far the corrected estimate still was. Thresholds multiply estimates by the factor, so
``compact_at: 0.8`` means 80% of the window as the provider counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

SMOOTHING = 0.2
"""Weight of a new sample: the factor settles within about ten calls."""
MIN_FACTOR, MAX_FACTOR = 0.25, 4.0
"""A sample outside these (a cached-context quirk, a broken usage figure) is not believed."""
SAMPLED_CALLS = 20
"""Every call of a model is sampled until it has this many samples..."""
SAMPLE_EVERY = 16
"""...then one call in this many, so the factor follows changes without counting every call."""


@dataclass(slots=True)
class ModelCalibration:
    factor: float = 1.0
    error: float = 0.0
    """Mean relative error of the corrected estimate before each sample, smoothed."""
    samples: int = 0
    calls: int = 0
    last_estimate: int = 0
    last_reported: int = 0

    def to_json(self) -> dict[str, float | int]:
        return {
            "factor": round(self.factor, 4),
            "error": round(self.error, 4),
            "samples": self.samples,
            "last_estimate": self.last_estimate,
            "last_reported": self.last_reported,
        }


class Calibration:
    """Correction factors by model, learned in this process from the providers' usage."""

    def __init__(self) -> None:
        self.models: dict[str, ModelCalibration] = {}

    def factor(self, model: str | None) -> float:
        found = self.models.get(model or "")
        return found.factor if found is not None else 1.0

    def wants_sample(self, model: str | None) -> bool:
        """Whether this call's input should be counted to calibrate (a count costs CPU)."""
        entry = self.models.setdefault(model or "", ModelCalibration())
        entry.calls += 1
        return entry.samples < SAMPLED_CALLS or entry.calls % SAMPLE_EVERY == 0

    def observe(self, model: str | None, estimate: int, reported: int) -> None:
        if estimate <= 0 or reported <= 0:
            return
        ratio = reported / estimate
        if not MIN_FACTOR <= ratio <= MAX_FACTOR:
            return
        entry = self.models.setdefault(model or "", ModelCalibration())
        error = abs(estimate * entry.factor - reported) / reported
        if entry.samples == 0:
            entry.factor, entry.error = ratio, error
        else:
            entry.factor += SMOOTHING * (ratio - entry.factor)
            entry.error += SMOOTHING * (error - entry.error)
        entry.samples += 1
        entry.last_estimate, entry.last_reported = estimate, reported

    def to_json(self) -> dict[str, dict[str, float | int]]:
        return {
            model: entry.to_json() for model, entry in sorted(self.models.items()) if entry.samples
        }
