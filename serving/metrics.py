"""``GET /metrics``: the model server's Prometheus metrics (prometheus-client).

With one process the metrics live in a registry of the application's own. With several worker
processes (``--workers``), prometheus-client's multiprocess mode is on: ``serving.app`` points
``PROMETHEUS_MULTIPROC_DIR`` at an empty folder before the workers start, each worker writes its
values to files there, and whichever worker answers ``/metrics`` sums them all. Counters and
histograms add up across workers; the served-version gauge keeps one series per live worker
(``pid`` label), so a worker still on the old version after a move shows as such.

Endpoint labels are the API's own route paths, templates included (``/v2/models/{model}/infer``),
and ``other`` for a path no route matches, so a client probing random paths cannot grow the
number of series.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def multiprocess_mode() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class ServerMetrics:
    """The metrics one application records, and their exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mnist_http_requests", "Requests answered", ["endpoint", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "mnist_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            ["endpoint", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.answers = Counter(
            "mnist_predictions", "Images answered, per digit", ["digit"], registry=r
        )
        self.confidence = Histogram(
            "mnist_prediction_confidence",
            "The top probability of each answer",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.served = Gauge(
            "mnist_served_model_info",
            "1 for the model version this process serves",
            ["name", "version", "format"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self.reload_failures = Counter(
            "mnist_model_reload_failures", "Failed loads of the alias' version", registry=r
        )
        self.feedback = Counter(
            "mnist_feedback", "Corrections received, by outcome", ["outcome"], registry=r
        )
        self.log_dropped = Counter(
            "mnist_inference_log_dropped", "Images not logged: the log's queue was full", registry=r
        )
        self.shadow_requests = Counter(
            "mnist_shadow_requests",
            "Requests the shadow model (serve.shadow) scored as well, per shadow version",
            ["version"],
            registry=r,
        )
        self.shadow_images = Counter(
            "mnist_shadow_images", "Images the shadow model scored", ["version"], registry=r
        )
        self.shadow_agreed = Counter(
            "mnist_shadow_agreed_images",
            "Images the shadow model gave the served model's digit",
            ["version"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "mnist_shadow_dropped", "Requests not scored in shadow: its queue was full", registry=r
        )
        self.shadow_info = Gauge(
            "mnist_shadow_model_info",
            "1 for the model version this process scores in shadow",
            ["name", "version", "alias"],
            multiprocess_mode="liveall",
            registry=r,
        )
        self._served_labels: tuple[str, str, str] | None = None
        self._shadow_labels: tuple[str, str, str] | None = None

    def observe_answers(self, digits, confidence) -> None:
        for digit in digits:
            self.answers.labels(digit=str(int(digit))).inc()
        for value in confidence:
            self.confidence.observe(float(value))

    @staticmethod
    def _moved(gauge: Gauge, old: tuple | None, new: tuple | None) -> tuple | None:
        """An info gauge moved from the ``old`` labels (set to 0) to the ``new`` ones (set to 1)."""
        if old is not None:
            gauge.labels(*old).set(0)
        if new is not None:
            gauge.labels(*new).set(1)
        return new

    def now_serving(self, name: str, version: str, file_name: str) -> None:
        self._served_labels = self._moved(
            self.served, self._served_labels, (name, version, file_name)
        )

    def now_shadowing(self, name: str, alias: str, version: str | None) -> None:
        """The shadow model's version (None: none loaded)."""
        new = None if version is None else (name, version, alias)
        self._shadow_labels = self._moved(self.shadow_info, self._shadow_labels, new)

    def shadow_scored(self, version: str, images: int, agreed: int) -> None:
        self.shadow_requests.labels(version=version).inc()
        self.shadow_images.labels(version=version).inc(images)
        self.shadow_agreed.labels(version=version).inc(agreed)

    def exposition(self) -> bytes:
        """The text format: this registry's, or every worker's summed in multiprocess mode;
        with ``mnist_shadow_agreement`` derived from the sums."""
        registry = self.registry
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(WithAgreement(registry))

    @staticmethod
    def process_exited() -> None:
        """In multiprocess mode, drop this worker's live gauges (its served version)."""
        if multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())


CONTENT_TYPE = CONTENT_TYPE_LATEST


class WithAgreement:
    """A registry's metrics plus the shadow's agreement per version: agreed images over scored
    images, computed from the counters after they are summed across workers (a gauge each worker
    set would show one worker's share)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self):
        sums: dict[str, dict[str, float]] = {"images": {}, "agreed": {}}
        for family in self.registry.collect():
            yield family
            kind = {"mnist_shadow_images": "images", "mnist_shadow_agreed_images": "agreed"}.get(
                family.name
            )
            for sample in family.samples if kind else ():
                if sample.name.endswith("_total"):
                    version = sample.labels["version"]
                    sums[kind][version] = sums[kind].get(version, 0.0) + sample.value
        agreement = GaugeMetricFamily(
            "mnist_shadow_agreement",
            "Share of the images scored in shadow that got the served model's digit",
            labels=["version"],
        )
        for version, images in sums["images"].items():
            if images:
                agreement.add_metric([version], sums["agreed"].get(version, 0.0) / images)
        yield agreement


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by endpoint, method and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: frozenset[str]) -> None:
        """``endpoints``: the API's fixed paths, for a request refused before the router ran
        (the size limit's 413)."""
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # if the application fails before it answers

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # the route the router matched (it writes it into this same scope), as its template
            path = getattr(scope.get("route"), "path", None)
            if path is None:
                path = scope["path"] if scope["path"] in self.endpoints else "other"
            labels = (path, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
