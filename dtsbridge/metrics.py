"""Prometheus metrics of one dtsbridge process (served at ``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: A metric read at scrape time: its kind, name, help text and reader.
_Source = tuple[Literal["gauge", "counter"], str, str, Callable[[], float]]


class Metrics:
    """Every metric lives in a private registry, so several services can share one Python process (tests)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_finished = Counter("dtsbridge_jobs_finished", "Jobs that ended, by final status and reason",
                                     ["status", "reason"], registry=r)
        self.jobs_started = Counter("dtsbridge_jobs_started", "Copies started by this process (attempts)", registry=r)
        self.bytes_copied = Counter("dtsbridge_bytes_copied", "Bytes copied and verified by this process", registry=r)
        self.files_copied = Counter("dtsbridge_files_copied", "Files copied and verified by this process", registry=r)
        self.job_seconds = Histogram("dtsbridge_job_duration_seconds", "Wall time of a copy attempt, from claim to end",
                                     ["status"], registry=r,
                                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
        self.phase_seconds = Histogram("dtsbridge_phase_duration_seconds", "Wall time of each phase of a copy",
                                       ["phase"], registry=r,
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
        self.requests = Counter("dtsbridge_http_requests", "HTTP requests answered, by route and code",
                                ["route", "code"], registry=r)
        self.manifest_files = Counter("dtsbridge_manifest_files",
                                      "Files of published jobs by how their manifest checked them: hashed, "
                                      "size_only (no hash given) or unverified (a multipart ETag no part size matched)",
                                      ["check"], registry=r)
        self.in_flight = Gauge("dtsbridge_jobs_in_flight", "Copies running in this process", registry=r)
        self._sources: list[_Source] = []
        r.register(_Callbacks(self._sources))

    def add_gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read at scrape time from ``read()`` (no I/O allowed in it)."""
        self._sources.append(("gauge", name, doc, read))

    def add_counter(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._sources.append(("counter", name, doc, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Callbacks:
    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for kind, name, doc, read in self.sources:
            try:
                value = float(read())
            except Exception:  # noqa: BLE001 - a broken reader must not break /metrics
                continue
            if kind == "gauge":
                yield GaugeMetricFamily(name, doc, value=value)
            else:
                yield CounterMetricFamily(name, doc, value=value)
