"""The Gaussian mechanism: the noise a release of L2 sensitivity Δ needs to be (ε, δ)-differentially private.

Adding N(0, σ² I) to a function f whose L2 sensitivity over neighbouring data sets is Δ gives (ε, δ)-DP when

    Φ(Δ / (2σ) − εσ / Δ) − e^ε · Φ(−Δ / (2σ) − εσ / Δ) ≤ δ            (Balle & Wang 2018, Theorem 8)

(Φ the standard normal CDF). That condition is exact, for every ε > 0; `gaussian_sigma` returns the smallest σ
meeting it (the analytic Gaussian mechanism), found by bisection on σ / Δ. The classic bound
σ = Δ · sqrt(2 ln(1.25 / δ)) / ε (Dwork & Roth, Theorem A.1, ε < 1) is larger and only an upper bracket here.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.special import log_ndtr, ndtr


def _privacy_loss_gap(sigma: float, epsilon: float) -> float:
    """The left-hand side of the condition above, at Δ = 1: the smallest δ that σ buys for ε."""
    a, b = 1.0 / (2.0 * sigma), epsilon * sigma
    return float(ndtr(a - b) - math.exp(epsilon + log_ndtr(-a - b)))


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest noise std that makes a release of L2 sensitivity `sensitivity` (ε, δ)-DP."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be within (0, 1), got {delta}")
    if not sensitivity >= 0:
        raise ValueError(f"sensitivity must be >= 0, got {sensitivity}")
    if sensitivity == 0:
        return 0.0
    high = max(1.0, math.sqrt(2 * math.log(1.25 / delta)) / epsilon)
    while _privacy_loss_gap(high, epsilon) > delta:
        high *= 2
    low = high
    while _privacy_loss_gap(low, epsilon) <= delta and low > 1e-12:
        low /= 2
    if _privacy_loss_gap(low, epsilon) <= delta:
        return low * sensitivity
    unit = brentq(lambda s: _privacy_loss_gap(s, epsilon) - delta, low, high, xtol=1e-12, rtol=1e-10)
    while _privacy_loss_gap(unit, epsilon) > delta:  # the root's safe side: never below the exact σ
        unit *= 1 + 1e-9
    return unit * sensitivity
