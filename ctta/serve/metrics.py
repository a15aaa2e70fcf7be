"""The server's Prometheus metrics (prometheus-client), in a registry of its own (two servers in one process, as in
tests, never share counters).

Latency histograms (request, model call), counters (requests by endpoint and status, errors by kind, samples,
resets, skipped updates), and the drift signal: mean entropy, normalised entropy and confidence of the last
``window`` predicted samples — the quantities `OnlineAdapter`'s ``drift`` callback sees, exported so that a
dashboard can alert on a shift the adapter has not reset for.
"""
from __future__ import annotations

import collections
import math
from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Everything /metrics reports; updated by the app (requests, errors) and by the model thread (calls)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, window: int = 256):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("ctta_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.request_seconds = Histogram("ctta_request_seconds", "HTTP request latency (receipt to response)",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("ctta_errors", "refused or failed requests by kind", ["kind"], registry=r)
        self.call_seconds = Histogram("ctta_model_call_seconds", "one model call (a micro-batch): adaptation and "
                                      "prediction, or prediction only", ["adapt"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("ctta_batch_images", "images per model call", buckets=BATCH_BUCKETS, registry=r)
        self.samples = Counter("ctta_samples", "images predicted, by whether the strategy adapted on them",
                               ["adapted"], registry=r)
        self.resets = Counter("ctta_resets", "resets of the adapted state (policy, drift callback or POST /reset)",
                              registry=r)
        self.skipped = Counter("ctta_skipped_updates", "adaptation steps skipped: non-finite loss or gradient",
                               registry=r)
        self.entropy = Gauge("ctta_window_entropy", "mean prediction entropy (nats) over the window", registry=r)
        self.entropy_norm = Gauge("ctta_window_entropy_normalized", "mean entropy / log(classes) over the window",
                                  registry=r)
        self.confidence = Gauge("ctta_window_confidence", "mean top-1 probability over the window", registry=r)
        self.queue = Gauge("ctta_queue_images", "images waiting for the model", registry=r)
        self.paused = Gauge("ctta_paused", "1 while adaptation is paused (POST /pause)", registry=r)
        self.position = Gauge("ctta_adapted_samples", "samples the adapter has adapted on (its stream position; "
                              "resumed from the state file)", registry=r)
        self.padded = Counter("ctta_padded_calls", "model calls smaller than the strategy's min_batch, padded "
                              "with earlier answered images and run without adaptation", registry=r)
        self.snapshots = Counter("ctta_snapshots", "adapted-state files written", registry=r)
        self._window: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=window)

    def observe_samples(self, entropies: Iterable[float], confidences: Iterable[float], n_classes: int) -> None:
        """Add predicted samples to the drift window and refresh its gauges."""
        log_c = math.log(n_classes) if n_classes > 1 else 1.0
        for h, c in zip(entropies, confidences):
            self._window.append((h, h / log_c if n_classes > 1 else 0.0, c))
        if self._window:
            k = len(self._window)
            self.entropy.set(sum(w[0] for w in self._window) / k)
            self.entropy_norm.set(sum(w[1] for w in self._window) / k)
            self.confidence.set(sum(w[2] for w in self._window) / k)

    def render(self) -> bytes:
        return generate_latest(self.registry)
