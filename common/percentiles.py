"""The one latency summary: percentiles of durations, in milliseconds.

The relay's stats (and through them the API and the web page), the
producer and viewer reports and the benchmark tables all summarise
latencies with :func:`percentiles_ms`, so the same samples read the same
everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: what the relay's stats and the API's stream status show
RELAY_QUANTILES = (0.50, 0.99)
#: what the producer and viewer reports show (text and ``--json``)
REPORT_QUANTILES = (0.50, 0.90, 0.99, 1.0)


def label(q: float) -> str:
    """``0.5`` -> ``"p50"``, ``0.999`` -> ``"p99.9"``, ``1.0`` -> ``"max"``."""
    return "max" if q >= 1 else f"p{q * 100:g}"


def percentiles_ms(
    samples: Iterable[float], quantiles: Sequence[float] = REPORT_QUANTILES
) -> dict[str, float | None]:
    """Nearest-rank percentiles of durations in seconds, as milliseconds rounded to 3 decimals.

    Keys are :func:`label` of each quantile, in order; every value is
    ``None`` when there are no samples, so the shape never depends on the data.
    """
    ordered = sorted(samples)
    if not ordered:
        return dict.fromkeys(map(label, quantiles))
    last = len(ordered) - 1
    return {label(q): round(ordered[min(last, int(q * len(ordered)))] * 1000, 3) for q in quantiles}
