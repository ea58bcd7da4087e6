"""Prometheus building blocks the launcher's metrics use: a gauge with no sample until it is measured, and
measurement times as Unix seconds."""

from __future__ import annotations

import datetime as dt

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily


class OptionalGauge:
    """An unlabelled gauge with no sample until it is set: absent, for Prometheus, means "not measured". It is
    declared (HELP and TYPE) from the start, so the family is known before it has a value."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self._value = float(value)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation)
        if self._value is not None:
            family.add_metric([], self._value)
        return [family]


def unix_time(iso: str) -> float | None:
    """An ISO 8601 time as Unix seconds (UTC when it names no zone); None when it is not one."""
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()
