"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Request counts by route, method and status; a request latency histogram by route; a histogram
of the batch sizes run on the model; the current queue depth.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)
    return f"{{{inner}}}" if inner else ""


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Histogram:
    """Cumulative-bucket histogram of one label set."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: Sequence[tuple[str, str]]) -> list[str]:
        out, cumulative = [], 0
        bounds = [_number(b) for b in self.buckets] + ["+Inf"]
        for bound, count in zip(bounds, self.counts, strict=True):
            cumulative += count
            out.append(f"{name}_bucket{_labels([*labels, ('le', bound)])} {cumulative}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.total)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Thread-safe counters and histograms of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._latency: dict[str, Histogram] = {}
        self._batches = Histogram(BATCH_BUCKETS)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, method, str(status))] += 1
            self._latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batches.observe(size)

    def render(self, queue_depth: int) -> str:
        """The exposition text."""
        with self._lock:
            lines = [
                "# HELP densedino_requests_total HTTP requests by route, method and status.",
                "# TYPE densedino_requests_total counter",
            ]
            for (route, method, status), count in sorted(self._requests.items()):
                labels = _labels([("route", route), ("method", method), ("status", status)])
                lines.append(f"densedino_requests_total{labels} {count}")
            lines += [
                "# HELP densedino_request_duration_seconds HTTP request latency by route.",
                "# TYPE densedino_request_duration_seconds histogram",
            ]
            for route, histogram in sorted(self._latency.items()):
                lines += histogram.lines("densedino_request_duration_seconds", [("route", route)])
            lines += [
                "# HELP densedino_batch_size Images per forward pass of the model.",
                "# TYPE densedino_batch_size histogram",
                *self._batches.lines("densedino_batch_size", []),
                "# HELP densedino_queue_depth Images waiting for the model.",
                "# TYPE densedino_queue_depth gauge",
                f"densedino_queue_depth {queue_depth}",
            ]
        return "\n".join(lines) + "\n"
