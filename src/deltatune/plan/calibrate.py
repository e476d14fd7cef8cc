"""Compare the memory model with a measurement, and calibrate its activation term from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.plan.memory import MemoryEstimate, estimate_memory
from deltatune.plan.probe import Measurement, probe
from deltatune.plan.setup import TrainSetup


@dataclass(frozen=True)
class Calibration:
    """An estimate next to the measured peak of the same setup."""

    estimate: MemoryEstimate
    """The uncalibrated estimate."""

    measured: Measurement
    """The probe's measurement."""

    activation_scale: float
    """Factor that makes the estimate's activation term match the measurement (1.0 when the peak is
    set by the optimizer step, where activations play no part)."""

    @property
    def error(self) -> float:
        """``estimate / measured - 1``."""
        return self.estimate.peak_bytes / self.measured.peak_bytes - 1.0


def activation_scale(estimate: MemoryEstimate, measured_peak: int) -> float:
    """The factor on the activation term that makes ``estimate`` equal ``measured_peak``.

    Everything but the activations is taken as estimated; the factor is clamped to [0.25, 4] so a
    noisy measurement cannot produce an absurd calibration.
    """
    acts = estimate.component("activations").at_peak
    if acts <= 0:
        return 1.0
    return min(4.0, max(0.25, (measured_peak - (estimate.peak_bytes - acts)) / acts))


def calibrate(model: Any, setup: TrainSetup, steps: int = 2) -> Calibration:
    """Estimate ``setup``, measure it with :func:`deltatune.plan.probe.probe`, and derive the scale."""
    est = estimate_memory(model, setup)
    measured = probe(model, setup, steps=steps)
    return Calibration(est, measured, activation_scale(est, measured.peak_bytes))
