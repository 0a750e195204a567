"""The server's Prometheus metrics: counters, gauges and latency histograms."""
from __future__ import annotations

import collections
import threading
import time


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
RATE_WINDOW_S = 10.0           # generated tokens/s is averaged over this many recent seconds
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499   # nginx's code for "client closed the request", used in metrics and logs


def label(value) -> str:
    """A Prometheus label value, escaped (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float, times: int = 1):
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += times
        self.sum += value * times
        self.n += times

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lb = f"{{{labels}}}" if labels else ""
        return out + [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{lb} {self.sum:.6f}",
                      f"{name}_count{lb} {self.n}"]


class Metrics:
    """Process-wide counters behind one lock (handlers run on many threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}          # (endpoint, status) -> count
        self.tokens: dict[str, list[int]] = {}                  # profile -> [generated, drafted, accepted]
        self.disconnects = 0
        self.inflight = 0
        self.rejected_connections = 0
        self.latency: dict[str, Histogram] = {}                 # endpoint -> request seconds
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.recent: collections.deque = collections.deque()    # (monotonic time, tokens)
        self.started = time.monotonic()

    def begin(self):
        with self._lock:
            self.inflight += 1

    def end(self):
        with self._lock:
            self.inflight -= 1

    def count_request(self, endpoint: str, status: int, seconds: float | None = None):
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if status == CLIENT_CLOSED:
                self.disconnects += 1
            if seconds is not None:
                self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def count_rejected_connection(self):
        with self._lock:
            self.rejected_connections += 1

    def count_tokens(self, profile: str | None, generated: int, drafted: int = 0, accepted: int = 0):
        with self._lock:
            row = self.tokens.setdefault(profile or "none", [0, 0, 0])
            row[0] += generated
            row[1] += drafted
            row[2] += accepted

    def observe_tokens(self, n: int, first: bool, seconds: float):
        """n tokens just arrived: the first of a request (seconds = time to first token, from
        arrival) or later ones (seconds = the wait since the previous tokens, shared by the n)."""
        now = time.monotonic()
        with self._lock:
            if first:
                self.ttft.observe(seconds)
            elif n:
                self.itl.observe(seconds / n, n)
            if n:
                self.recent.append((now, n))
            self._prune(now)

    def _prune(self, now: float):
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def render(self, gauges: dict) -> str:
        """Prometheus text exposition format 0.0.4. gauges: name -> (help, value) from the server."""
        with self._lock:
            now = time.monotonic()
            self._prune(now)
            window = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
            rate = sum(n for _, n in self.recent) / window
            out = ["# HELP conflayers_requests_total HTTP requests answered, by endpoint and status "
                   f"({CLIENT_CLOSED} = the client disconnected).",
                   "# TYPE conflayers_requests_total counter"]
            out += [f'conflayers_requests_total{{endpoint="{label(e)}",status="{label(s)}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            for i, (name, text) in enumerate([
                    ("generated_tokens", "Tokens generated (returned to clients), by draft profile."),
                    ("draft_tokens", "Tokens proposed by the draft, by draft profile."),
                    ("accepted_tokens", "Draft tokens the full model accepted, by draft profile.")]):
                out += [f"# HELP conflayers_{name}_total {text}", f"# TYPE conflayers_{name}_total counter"]
                out += [f'conflayers_{name}_total{{profile="{label(p)}"}} {row[i]}'
                        for p, row in sorted(self.tokens.items())]
            out += ["# HELP conflayers_acceptance_rate Draft tokens accepted / proposed since start, by profile.",
                    "# TYPE conflayers_acceptance_rate gauge"]
            out += [f'conflayers_acceptance_rate{{profile="{label(p)}"}} {row[2] / row[1]:.6f}'
                    for p, row in sorted(self.tokens.items()) if row[1]]
            out += [f"# HELP conflayers_generated_tokens_per_second Tokens generated per second, all requests, "
                    f"over the last {RATE_WINDOW_S:g} s.",
                    "# TYPE conflayers_generated_tokens_per_second gauge",
                    f"conflayers_generated_tokens_per_second {rate:.3f}",
                    "# HELP conflayers_client_disconnects_total Requests the client closed before the end.",
                    "# TYPE conflayers_client_disconnects_total counter",
                    f"conflayers_client_disconnects_total {self.disconnects}",
                    "# HELP conflayers_rejected_connections_total Connections answered 503 at accept "
                    "(--max-connections reached).",
                    "# TYPE conflayers_rejected_connections_total counter",
                    f"conflayers_rejected_connections_total {self.rejected_connections}",
                    "# HELP conflayers_inflight_requests Generation requests being served or waiting.",
                    "# TYPE conflayers_inflight_requests gauge",
                    f"conflayers_inflight_requests {self.inflight}"]
            for name, (text, value) in gauges.items():
                out += [f"# HELP conflayers_{name} {text}", f"# TYPE conflayers_{name} gauge",
                        f"conflayers_{name} {value}"]
            out += ["# HELP conflayers_time_to_first_token_seconds From a request's arrival (queueing "
                    "included) to its first generated token.",
                    "# TYPE conflayers_time_to_first_token_seconds histogram"]
            out += self.ttft.render("conflayers_time_to_first_token_seconds")
            out += ["# HELP conflayers_inter_token_latency_seconds Time per generated token after the first "
                    "(a speculative step's tokens share its time).",
                    "# TYPE conflayers_inter_token_latency_seconds histogram"]
            out += self.itl.render("conflayers_inter_token_latency_seconds")
            out += ["# HELP conflayers_request_seconds Generation request latency, including queueing.",
                    "# TYPE conflayers_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.render("conflayers_request_seconds", f'endpoint="{label(e)}"')
            return "\n".join(out) + "\n"
