"""Prometheus text exposition of the counters daemons keep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def counters(prefix: str, values: Mapping[str, int | float], labels: Mapping[str, str],
             gauges: Sequence[str] = ()) -> list[str]:
    """``# TYPE`` and sample lines for plain counters (and the named gauges)."""
    lines = []
    for name, value in sorted(values.items()):
        kind = "gauge" if name in gauges else "counter"
        metric = f"{prefix}_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# TYPE {metric} {kind}", f"{metric}{_labels(labels)} {value}"]
    return lines


def histogram(name: str, bounds: Sequence[float], counts: Sequence[int], total: float,
              labels: Mapping[str, str]) -> list[str]:
    """A Prometheus histogram from per-bucket (non-cumulative) counts; the last count is +Inf."""
    lines = [f"# TYPE {name} histogram"]
    running = 0
    for bound, count in zip([*bounds, float("inf")], counts, strict=True):
        running += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
    lines += [f"{name}_sum{_labels(labels)} {total}", f"{name}_count{_labels(labels)} {running}"]
    return lines
