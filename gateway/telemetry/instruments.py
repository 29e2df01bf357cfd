"""Counters, gauges and histograms updated on the event loop, exported through the client
library's collector interface.

The library's own metric objects take a lock on every update and check every label value on
every lookup: the gateway makes about twenty updates per request, all from the one event-loop
thread, so that safety cost it about 150,000 instructions a request (callgrind). Here a series
is a dict entry keyed by its label values' tuple; the library still owns the registry and both
expositions (text and OpenMetrics, with exemplars).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class Family(Collector):
    """One metric family: a name, its help text, its label names, and its series."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)

    def describe(self) -> Iterable[Metric]:
        """The family without samples: lets the registry refuse a second family of this name."""
        yield self._family()

    def _family(self) -> Metric:
        raise NotImplementedError


class _Values(Family):
    """A family whose series are one number each (counters, gauges)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        raise NotImplementedError

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family


class Counter(_Values):
    def touch(self, labels: Labels) -> None:
        """Export the series at 0 before its first increment (``increase()`` needs a start)."""
        self.values.setdefault(labels, 0.0)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class Gauge(_Values):
    def dec(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) - amount

    def set(self, labels: Labels, value: float) -> None:
        self.values[labels] = value

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class _Series:
    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] = [None] * size


class Histogram(Family):
    """Cumulative buckets with ``le`` bounds, plus ``+Inf``; each bucket keeps the trace id of
    its latest observation that came with one, as its exemplar."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self.series: dict[Labels, _Series] = {}

    def observe(self, labels: Labels, value: float, trace_id: str | None = None) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _Series(len(self._les))
        bucket = bisect_left(self.bounds, value)  # the first bound >= value: ``le`` semantics
        series.counts[bucket] += 1
        series.sum += value
        if trace_id is not None:
            series.exemplars[bucket] = Exemplar({"trace_id": trace_id}, value, time.time())

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for labels, series in list(self.series.items()):
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            total = 0
            for le, count, exemplar in zip(self._les, series.counts, series.exemplars, strict=True):
                total += count
                buckets.append((le, total) if exemplar is None else (le, total, exemplar))
            family.add_metric(labels, buckets, series.sum)
        yield family
