"""How a measured effect is put into words: only as strongly as its interval allows.

An effect is stated as a finding only when its 95% interval excludes zero; otherwise it is called
"not distinguishable from zero", whatever its point estimate. A ratio of two effects (the fraction
of a drop that is recovered, the fraction of a gap a head restores) is withheld when the
denominator's interval includes zero: dividing by a quantity that may be zero gives an interval
without meaning (e.g. 0.59 [-0.48, 9.9]). Tables, summaries, the report, README and docs all
word their results through these functions.
"""

from __future__ import annotations

import math

NOT_DISTINGUISHABLE = "not distinguishable from zero"
# every resample gave the same value: one image, identical images, or a statistic that cannot
# move; such an interval says nothing about the spread, so it is never read as a finding
ZERO_WIDTH = "no interval: every resample gives the same value (one image or identical images)"


def excludes_zero(low: float, high: float) -> bool:
    """True when the interval [low, high] lies wholly above or wholly below zero (and has width)."""
    if _missing(low) or _missing(high) or low == high:
        return False
    return low > 0 or high < 0


def verdict(low: float, high: float) -> str:
    """"above zero", "below zero", "not distinguishable from zero", "no interval", or `ZERO_WIDTH`."""
    if _missing(low) or _missing(high):
        return "no interval"
    if low == high:
        return ZERO_WIDTH
    if low > 0:
        return "above zero"
    if high < 0:
        return "below zero"
    return NOT_DISTINGUISHABLE


def with_interval(value: float, low: float, high: float, *, digits: int = 3, signed: bool = False) -> str:
    """"0.017 [-0.002, 0.037]" (with `signed`, every number carries its sign)."""
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def effect_phrase(value: float, low: float, high: float, *, digits: int = 3, signed: bool = False) -> str:
    """The effect with its interval, followed by ", not distinguishable from zero" when the
    interval includes zero."""
    text = with_interval(value, low, high, digits=digits, signed=signed)
    if not _missing(low) and low == high:
        return f"{text}, {ZERO_WIDTH}"
    return text if excludes_zero(low, high) else f"{text}, {NOT_DISTINGUISHABLE}"


def _missing(x: float | None) -> bool:
    return x is None or math.isnan(float(x))


__all__ = ["NOT_DISTINGUISHABLE", "ZERO_WIDTH", "effect_phrase", "excludes_zero", "verdict", "with_interval"]
