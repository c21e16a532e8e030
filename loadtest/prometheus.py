"""Server-side numbers from Prometheus ``/metrics`` pages: a text-format parser, the series the load test reads
(Baton's, and vLLM's and SGLang's names for the same things, so a peer server is read alike), and a poller that
samples them while a run goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class ParseError(ValueError):
    pass


def _labels(text: str) -> Labels:
    labels, pos = [], 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        if not match:
            if text[pos:].strip():
                raise ParseError(f"bad labels {text!r}")
            break
        value = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], match.group(2))
        labels.append((match.group(1), value))
        pos = match.end()
    return tuple(sorted(labels))


def parse(text: str) -> Samples:
    """``(name, sorted labels) -> value`` for every sample line of a Prometheus text exposition."""
    samples: Samples = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ParseError(f"line {number}: not a sample: {line!r}")
        value = match.group("value")
        try:
            number_value = float(value)  # accepts NaN, +Inf, -Inf
        except ValueError:
            raise ParseError(f"line {number}: bad value {value!r}") from None
        samples[(match.group("name"), _labels(match.group("labels") or ""))] = number_value
    return samples


def select(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None if there is none."""
    want = set(labels.items())
    values = [v for (n, ls), v in samples.items() if n == name and want <= set(ls) and not math.isnan(v)]
    return sum(values) if values else None


# What the load test reads, by meaning: the first candidate a server exposes is used.
SERIES: dict[str, list[tuple[str, dict[str, str]]]] = {
    "running": [("baton_engine_requests", {"state": "running"}), ("vllm:num_requests_running", {}),
                ("sglang:num_running_reqs", {})],
    "waiting": [("baton_engine_requests", {"state": "waiting"}), ("vllm:num_requests_waiting", {}),
                ("sglang:num_queue_reqs", {})],
    "kv_pages_used": [("baton_kv_pages_used", {})],
    "kv_pages_total": [("baton_kv_pages_capacity", {})],
    "kv_usage": [("vllm:kv_cache_usage_perc", {}), ("sglang:token_usage", {})],
    # Counters: prompt tokens looked up in the prefix cache, and those served from it.
    "prefix_prompt_tokens": [("baton_prefix_cache_query_tokens_total", {}),
                             ("vllm:prefix_cache_queries_total", {})],
    "prefix_cached_tokens": [("baton_prefix_cache_hit_tokens_total", {}),
                             ("vllm:prefix_cache_hits_total", {})],
    "transfer_bytes": [("baton_transfer_bytes_total", {})],
}
COUNTERS = ("prefix_prompt_tokens", "prefix_cached_tokens", "transfer_bytes")


def read(samples: Samples) -> dict[str, float]:
    """The ``SERIES`` a server exposes, by meaning; missing ones are left out."""
    out = {}
    for meaning, candidates in SERIES.items():
        for name, labels in candidates:
            value = select(samples, name, **labels)
            if value is not None:
                out[meaning] = value
                break
    if "kv_usage" not in out and out.get("kv_pages_total"):
        out["kv_usage"] = out.get("kv_pages_used", 0.0) / out["kv_pages_total"]
    return out


@dataclass
class PodSeries:
    url: str
    times: list[float] = field(default_factory=list)  # seconds since the run's clock zero
    values: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0
    last_error: str = ""

    def counter_deltas(self) -> dict[str, float]:
        """Counter increase between the first and the last scrape."""
        if len(self.values) < 2:
            return {}
        first, last = self.values[0], self.values[-1]
        return {k: last[k] - first[k] for k in COUNTERS if k in first and k in last}

    def to_json(self) -> dict:
        keys = sorted({k for v in self.values for k in v})
        return {"url": self.url, "t": self.times, "series": {k: [v.get(k) for v in self.values] for k in keys},
                "counter_deltas": self.counter_deltas(), "scrape_errors": self.errors, "last_error": self.last_error}


class Poller:
    """Scrapes every URL once when started (before any request), each ``interval_s`` after, and once more when
    stopped (after the last answer), so counter deltas cover exactly the run."""

    def __init__(self, urls: list[str], interval_s: float, clock_zero: float) -> None:
        self.series = [PodSeries(u) for u in urls]
        self.interval_s = interval_s
        self.clock_zero = clock_zero
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session = None

    async def _scrape(self, pod: PodSeries) -> None:
        import aiohttp

        try:
            async with self._session.get(pod.url) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise ParseError(f"HTTP {resp.status}")
            values = read(parse(text))
        except (aiohttp.ClientError, TimeoutError, ParseError) as err:
            pod.errors += 1
            pod.last_error = str(err) or type(err).__name__
            return
        pod.times.append(time.perf_counter() - self.clock_zero)
        pod.values.append(values)

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self._scrape(p) for p in self.series))

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the sampling period; stop() ends the wait at once
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            if self._stop.is_set():
                return
            await self.scrape_all()

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await self.scrape_all()  # before the first request: counter deltas cover every request of the run
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> list[PodSeries]:
        self._stop.set()
        if self._task is not None:
            await self._task
        await self.scrape_all()
        await self._session.close()
        return self.series
