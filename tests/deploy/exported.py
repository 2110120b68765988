"""The series names and label names that the service exports, read from prometheus-client.

Importing app.metrics registers every collector in prometheus-client's REGISTRY. The
exposed series names follow each family's type; a labelled family has no samples until
it is first used, so the names come from the family type, checked against real samples
where there are some (see test_dashboard.py).
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import app.metrics

SERIES_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def mmgpt_collectors() -> list[MetricWrapperBase]:
    return [value for value in vars(app.metrics).values() if isinstance(value, MetricWrapperBase)]


def _label_names(collector: MetricWrapperBase) -> tuple[str, ...]:
    # prometheus-client keeps a collector's label names only in this attribute.
    names: tuple[str, ...] = collector._labelnames
    return names


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name in the service's exposition, with the label names it carries."""
    labels_by_family = {
        family.name: frozenset(_label_names(collector))
        for collector in mmgpt_collectors()
        for family in collector.describe()
    }
    series: dict[str, frozenset[str]] = {}
    for family in REGISTRY.collect():
        family_labels = labels_by_family.get(family.name, frozenset())
        for suffix in SERIES_SUFFIXES[family.type]:
            series[family.name + suffix] = family_labels
    return series
