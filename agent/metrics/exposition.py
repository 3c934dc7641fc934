"""Prometheus' text exposition format (version 0.0.4), written by hand.

    # HELP name text
    # TYPE name counter|gauge|histogram
    name{label="value",...} 1.5

A histogram is written as its cumulative `_bucket{le="..."}` series (ending
with `le="+Inf"`), `_sum` and `_count`. Label values escape backslash,
double quote and newline; HELP text escapes backslash and newline. Families
are written in the order given, samples in the order added.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TYPES = ("counter", "gauge", "histogram")


@dataclass(frozen=True)
class Sample:
    labels: tuple[tuple[str, str], ...]
    value: float
    suffix: str = ""  # _bucket, _sum, _count for histograms


@dataclass
class MetricFamily:
    name: str
    type: str
    help: str
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"metric {self.name}: unknown type {self.type}")

    def add(self, value: float, labels: Mapping[str, str] | None = None) -> MetricFamily:
        self.samples.append(Sample(tuple((labels or {}).items()), float(value)))
        return self

    def add_histogram(
        self,
        buckets: Sequence[tuple[float, int]],
        total: float,
        labels: Mapping[str, str] | None = None,
    ) -> MetricFamily:
        """`buckets`: (upper bound, cumulative count), ending with +Inf."""
        base = tuple((labels or {}).items())
        for bound, count in buckets:
            self.samples.append(Sample((*base, ("le", format_value(bound))), count, "_bucket"))
        self.samples.append(Sample(base, total, "_sum"))
        self.samples.append(Sample(base, buckets[-1][1] if buckets else 0, "_count"))
        return self


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(families: Iterable[MetricFamily]) -> str:
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for s in family.samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels)
            name = family.name + s.suffix
            lines.append(f"{name}{{{labels}}} {format_value(s.value)}" if labels
                         else f"{name} {format_value(s.value)}")
    return "".join(f"{line}\n" for line in lines)


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The samples of a text exposition: {series name: {labels: value}}.

    For tests and scripts reading a scrape; it understands what `render`
    writes (no timestamps, no escaped quotes inside label values).
    """
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, rest = series.partition("{")
        labels: tuple[tuple[str, str], ...] = ()
        if rest:
            pairs = [p for p in rest.rstrip("}").split('",') if p]
            labels = tuple(
                (k, v.strip('"')) for k, _, v in (p.partition("=") for p in pairs)
            )
        out.setdefault(name, {})[labels] = float(value)
    return out
