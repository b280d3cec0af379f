"""One look at a served model: the figures a monitor records each time, and the thresholds they must stay within.

    latency_p50_s, latency_p95_s   of the answered requests
    error_rate                     failed requests / requests (refused, timed out, error status, bad body)
    perplexity                     of the endpoint's answers after their prompts, under the reference model
    perplexity_ratio               that perplexity / the perplexity of the reference's own greedy answers
    changed_share                  answered probes whose answer differs from the reference's greedy one

A figure crosses its threshold when it exceeds it; a figure that could not be measured (no request
answered) is not compared, the error rate says why.
"""

from __future__ import annotations

import math

from pydantic import Field

from jielong.tasks.core.schema import Strict


class Thresholds(Strict):
    """What a healthy deployment stays within (monitor settings; the defaults suit a greedy small model)."""

    max_error_rate: float = Field(0.1, ge=0, le=1, description="failed requests / requests")
    max_latency_p95_s: float = Field(10.0, gt=0, description="seconds")
    max_changed_share: float = Field(0.25, ge=0, le=1, description="share of probes answered otherwise than the reference")
    max_perplexity_ratio: float = Field(2.0, gt=0, description="answers' perplexity / the reference answers' perplexity")


def figures_of(check_figures: dict, perplexity: float, reference_perplexity: float) -> dict[str, float]:
    """The monitored figures from a check's figures (tasks/lib/deploy/check.py) and the perplexities."""
    ratio = perplexity / reference_perplexity if reference_perplexity > 0 else float("nan")
    return {
        "latency_p50_s": check_figures["latency_p50_s"],
        "latency_p95_s": check_figures["latency_p95_s"],
        "error_rate": check_figures["error_rate"],
        "perplexity": perplexity,
        "perplexity_ratio": ratio,
        "changed_share": check_figures["changed_share"],
    }


LIMITS = {"error_rate": "max_error_rate", "latency_p95_s": "max_latency_p95_s", "changed_share": "max_changed_share",
          "perplexity_ratio": "max_perplexity_ratio"}


def crossed(figures: dict[str, float], thresholds: Thresholds) -> list[str]:
    """One line per figure over its threshold, e.g. "error_rate 1.000 > 0.100 (max_error_rate)"."""
    lines = []
    for figure, setting in LIMITS.items():
        value, limit = figures[figure], getattr(thresholds, setting)
        if not math.isnan(value) and value > limit:
            lines.append(f"{figure} {value:.3f} > {limit:g} ({setting})")
    return lines


def thresholds_from(values: dict | None) -> Thresholds:
    """Thresholds from settings (unset ones at their defaults); a bad value is a one-line UserError."""
    from pydantic import ValidationError

    from jielong.tasks.core.schema import UserError

    try:
        return Thresholds(**{k: v for k, v in (values or {}).items() if v is not None})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserError(f"monitor thresholds: {problems}") from None
