"""Exemplars on the Prometheus endpoint: each histogram bucket's latest traced value, with its
``trace_id`` and ``span_id``, in the OpenMetrics exposition.

opentelemetry-exporter-prometheus (0.66b2) writes histogram points without their exemplars (adding
them is open-telemetry/opentelemetry-python#4178, not merged). prometheus_client writes a bucket
sample's exemplar, but only in the OpenMetrics format, which its HTTP server serves to a scraper
that asks for it (``Accept: application/openmetrics-text``, what Prometheus sends by default); the
classic text format has no exemplars. So the exporter's collector goes into a registry of its own,
and :class:`OpenMetricsExemplars`, the collector the endpoint serves, passes its metric families on
with the exemplars of fetchpool's histograms (:mod:`fetchpool.telemetry.histograms`) put on their
buckets. Prometheus stores them with ``--enable-feature=exemplar-storage``.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

from fetchpool.telemetry.histograms import Histogram, Sample

_NOT_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def _labels(attributes: dict[str, Any]) -> frozenset[tuple[str, str]]:
    """The Prometheus labels the OpenTelemetry exporter makes of ``attributes`` (its key and value
    conversions: other characters to ``_``, non-strings as JSON)."""
    return frozenset(
        (_NOT_LABEL.sub("_", key), value if isinstance(value, str) else json.dumps(value, default=str))
        for key, value in attributes.items())


class OpenMetricsExemplars(Collector):
    """The metric families of ``source`` (a registry holding the OpenTelemetry exporter's
    collector), with the exemplars of the histograms given to :meth:`show` on their buckets."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source
        self._histograms: dict[str, Histogram] = {}

    def show(self, histograms: Sequence[Histogram]) -> None:
        """Put the exemplars of ``histograms`` on the exposition from now on."""
        self._histograms = {h.metric.prometheus: h for h in histograms}

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            histogram = self._histograms.get(family.name) if family.type == "histogram" else None
            if histogram is not None:
                _add_exemplars(family, histogram)
            yield family


def _add_exemplars(family: Metric, histogram: Histogram) -> None:
    by_labels = {_labels(attributes): samples for attributes, samples in histogram.exemplars()}
    if not by_labels:
        return
    bucket_name = family.name + "_bucket"
    for i, sample in enumerate(family.samples):
        if sample.name != bucket_name:
            continue
        labels = frozenset((k, v) for k, v in sample.labels.items() if k != "le" and v != "")
        samples = by_labels.get(labels)
        if samples is None:
            continue
        bound = float(sample.labels["le"])
        exemplar: Sample | None = samples[len(histogram.bounds) if math.isinf(bound) else
                                          bisect_left(histogram.bounds, bound)]
        if exemplar is not None:
            value, time_ns, trace_id, span_id = exemplar
            family.samples[i] = sample._replace(exemplar=Exemplar(
                {"trace_id": format(trace_id, "032x"), "span_id": format(span_id, "016x")}, value, time_ns / 1e9))
