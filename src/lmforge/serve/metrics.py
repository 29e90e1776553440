"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: a
few counters, gauges and histograms need no dependency.

    lmforge_requests_total{endpoint="/v1/chat/completions",status="200"} 12
    lmforge_time_to_first_token_seconds_bucket{le="0.05"} 3
    ...

Counters only grow; histograms are cumulative buckets plus _sum and _count, as Prometheus wants.
Updates come from the engine thread and the HTTP handlers at once, so one lock guards them.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, n in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports; `render(gauges)` adds the live values (running, waiting, cache)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0
        self.ttft = Histogram()
        self.per_token = Histogram()
        self.e2e = Histogram()

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            self.cached_prompt_tokens += cached

    def observe(self, ttft: float | None = None, per_token: float | None = None, e2e: float | None = None) -> None:
        with self.lock:
            for h, v in ((self.ttft, ttft), (self.per_token, per_token), (self.e2e, e2e)):
                if v is not None:
                    h.observe(v)

    def render(self, gauges: dict[str, float]) -> str:
        """The exposition text; `gauges` {name: value} are the engine's live values."""
        def head(name, kind, text):
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]

        with self.lock:
            lines = head("lmforge_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'lmforge_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, value, text in (
                    ("lmforge_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of admitted requests."),
                    ("lmforge_generation_tokens_total", self.generation_tokens, "Tokens generated."),
                    ("lmforge_prompt_tokens_cached_total", self.cached_prompt_tokens,
                     "Prompt tokens served from the prefix cache (usage.prompt_tokens_details.cached_tokens).")):
                lines += head(name, "counter", text) + [f"{name} {value}"]
            for name, h, text in (("lmforge_time_to_first_token_seconds", self.ttft, "Arrival to first generated token."),
                                  ("lmforge_time_per_output_token_seconds", self.per_token, "Time between tokens of a sample."),
                                  ("lmforge_e2e_request_latency_seconds", self.e2e, "Arrival to the last token of a request.")):
                lines += head(name, "histogram", text) + h.lines(name)
        for name, (kind, value, text) in gauges.items():
            lines += head(name, kind, text) + [f"{name} {value}"]
        return "\n".join(lines) + "\n"
