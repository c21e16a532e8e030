"""The load runner: sends a workload's sessions to a server and records every request's timing.

- Closed loop (``mode="closed"``): N conversations at a time; each sends a turn, waits for the whole answer,
  waits the turn's think time, sends the next; when a conversation (with the sub-agents branching from it)
  ends, the next one starts. One level per concurrency of ``concurrency``.
- Open loop (``mode="open"``): conversations arrive by a Poisson process of ``rate`` per second (one level per
  rate), or at the workload's own timestamps (a trace; ``rate`` empty), whatever is still running.

Within a conversation, each prompt is the history (earlier prompts and the server's real answers) plus the
turn's new tokens, so follow-up turns can hit the server's prefix cache exactly as a client's would. Several
levels run one after the other; each expands the workload under its own salt (``salt + level``) so a level
never hits the cache left by the one before (the reuse structure is the same).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.clients import Client, GrpcClient, OpenAIClient, Prompt, RequestError, Sampling
from loadtest.prometheus import Poller
from loadtest.stats import RequestRecord, distribution, summarize
from loadtest.tokens import BlockHasher, PrefixIndex
from loadtest.workload import Session, Workload, expand

log = logging.getLogger("loadtest")


class RunError(RuntimeError):
    """A run that cannot go on (bad configuration, a server that does not fit the workload)."""


@dataclass
class RunConfig:
    workload: str  # a workload JSONL file (``python -m loadtest generate ...``)
    api: str = "grpc"  # grpc (baton.v1.Inference) | openai (/v1/completions)
    target: str = "127.0.0.1:50051"  # host:port for gRPC, base URL (http://host:port) for OpenAI
    model: str = ""  # the OpenAI "model" field ("": the first of /v1/models)
    mode: str = "closed"  # closed | open
    concurrency: tuple[int, ...] = (8,)  # closed loop: conversations at a time, one level each
    rate: tuple[float, ...] = ()  # open loop: conversations per second, one level each; empty: trace timestamps
    speedup: float = 1.0  # trace timestamps are divided by this
    think_time_scale: float = 1.0  # think times are multiplied by this (0: none)
    max_sessions: int | None = None  # conversations taken from the workload (None: all)
    max_duration_s: float | None = None  # per level: no new turn starts after this
    # Closed loop: conversation slot i starts i/concurrency of this into the level, so first turns arrive spread out
    # as in steady state rather than all at once; the level's summary then counts only requests started after it
    # (``summary_with_ramp``: all of them).
    ramp_s: float = 0.0
    request_timeout_s: float = 600.0
    prompt_format: str = "ids"  # ids | text (decoded with ``tokenizer``)
    tokenizer: str | None = None  # tokenizer.json (or a directory holding it)
    return_token_ids: bool = False  # OpenAI: ask for the answer's token ids (vLLM's return_token_ids)
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    metrics_urls: tuple[str, ...] = ()  # Prometheus /metrics of the servers (pods) to follow
    scrape_interval_s: float = 0.5
    salt: int = 0  # 0: the workload's own tokens; another value: fresh tokens, same structure
    seed: int = 0  # Poisson arrivals
    reuse_block: int = 0  # granularity of the reusable-prefix accounting, tokens (0: the server's page size, else 16)
    decode_floor_tok_s: float = 70.0  # per-user decode speed a request should hold
    grpc_channels: int = 4
    progress: bool = True
    out: str = "loadtest.json"
    record_trace: str | None = None  # also write what was sent as a Mooncake trace (ids prompts)

    def __post_init__(self) -> None:
        if self.api not in ("grpc", "openai"):
            raise RunError(f"api must be grpc or openai, got {self.api!r}")
        if self.mode not in ("closed", "open"):
            raise RunError(f"mode must be closed or open, got {self.mode!r}")
        if self.prompt_format not in ("ids", "text"):
            raise RunError(f"prompt_format must be ids or text, got {self.prompt_format!r}")
        if self.mode == "closed" and (not self.concurrency or min(self.concurrency) < 1):
            raise RunError("closed loop needs concurrency >= 1")
        if any(r <= 0 for r in self.rate):
            raise RunError("rates must be > 0")
        if self.speedup <= 0 or self.think_time_scale < 0:
            raise RunError("speedup must be > 0 and think_time_scale >= 0")
        if self.ramp_s < 0 or (self.ramp_s and self.mode != "closed"):
            raise RunError("ramp_s must be >= 0, and only the closed loop ramps")
        if self.ramp_s and self.max_duration_s is not None and self.ramp_s >= self.max_duration_s:
            raise RunError(f"ramp_s ({self.ramp_s}) must be shorter than max_duration_s ({self.max_duration_s})")
        if self.prompt_format == "text" and not self.tokenizer:
            raise RunError("text prompts need --tokenizer (the workload's tokens are decoded to text with it)")
        if self.record_trace and self.prompt_format != "ids":
            raise RunError("--record-trace needs token-id prompts")

    @property
    def levels(self) -> list[dict]:
        if self.mode == "closed":
            return [{"concurrency": c} for c in self.concurrency]
        return [{"rate": r} for r in self.rate] or [{"rate": None}]


class PromptCodec:
    """Prompts as token ids or as text: new tokens are decoded to text for text prompts; answers come back as
    ids (when the server gives them, else encoded from their text) or as text."""

    def __init__(self, prompt_format: str, tokenizer_path: str | None) -> None:
        self.text = prompt_format == "text"
        self.tokenizer = None
        if tokenizer_path:
            from tokenizers import Tokenizer

            path = Path(tokenizer_path)
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))

    def empty(self) -> Prompt:
        return "" if self.text else []

    def new_tokens(self, ids: list[int]) -> Prompt:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.text else ids

    def answer(self, ids: list[int] | None, text: str) -> Prompt:
        if self.text:
            return text
        if ids is not None:
            return ids
        if self.tokenizer is None:
            raise RunError("the server streamed text without token ids: follow-up turns need the answer's ids; "
                           "pass --tokenizer, or --return-token-ids if the server supports it")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def length(self, prompt: Prompt) -> int | None:
        return None if self.text else len(prompt)


def make_client(config: RunConfig) -> Client:
    sampling = Sampling(config.temperature, config.ignore_eos)
    if config.api == "grpc":
        return GrpcClient(config.target, sampling, config.request_timeout_s, config.grpc_channels)
    return OpenAIClient(config.target, config.model, sampling, config.request_timeout_s, config.api_key,
                        config.return_token_ids)


@dataclass
class _Level:
    """What one level's sessions share while it runs."""

    index: int
    salt: int
    clock_zero: float
    deadline: float | None
    records: list[RequestRecord] = field(default_factory=list)
    not_sent: Counter = field(default_factory=Counter)
    prefix_index: PrefixIndex | None = None
    trace: list[dict] = field(default_factory=list)
    bar: object = None
    errors: int = 0

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline


class Runner:
    def __init__(self, config: RunConfig, workload: Workload, client: Client, page_size: int = 0) -> None:
        self.config = config
        self.reuse_block = config.reuse_block or page_size or 16
        self.workload = workload
        self.client = client
        self.codec = PromptCodec(config.prompt_format, config.tokenizer)
        self.children = workload.children()
        self.turns_below = self._turns_below()
        self.run_id = uuid.uuid4().hex[:8]
        self.hasher = BlockHasher(512) if config.record_trace else None
        roots = workload.roots
        self.roots = roots[:config.max_sessions] if config.max_sessions is not None else roots
        multi_turn = any(len(s.turns) > 1 for s in workload.sessions) or bool(self.children)
        if (config.api == "openai" and config.prompt_format == "ids" and multi_turn and not config.tokenizer
                and not config.return_token_ids):
            raise RunError("multi-turn token-id prompts over OpenAI HTTP need the answers' ids: pass --tokenizer "
                           "or --return-token-ids")

    def _turns_below(self) -> dict[int, int]:
        """Session id -> turns in it and in every session branching from it."""
        below: dict[int, int] = {}
        for s in reversed(self.workload.sessions):  # children come after their parents
            below[s.id] = len(s.turns) + sum(below[c.id] for k in range(len(s.turns))
                                             for c in self.children.get((s.id, k), []))
        return below

    def _unsent(self, session: Session, first_unsent_turn: int, first_unspawned_turn: int) -> int:
        return len(session.turns) - first_unsent_turn + sum(
            self.turns_below[c.id] for k in range(first_unspawned_turn, len(session.turns))
            for c in self.children.get((session.id, k), []))

    # ---- one request --------------------------------------------------------------------------------------
    async def _send(self, level: _Level, session: Session, turn: int, prompt: Prompt) -> Prompt | None:
        max_tokens = session.turns[turn].max_tokens
        ids_prompt = None if self.codec.text else prompt
        record = RequestRecord(
            session=session.id, turn=turn, start_s=time.perf_counter() - level.clock_zero,
            prompt_tokens=self.codec.length(prompt) or 0, max_tokens=max_tokens,
            reusable_tokens=level.prefix_index.reusable(ids_prompt) if level.prefix_index is not None else None,
        )
        answer_ids: list[int] | None = []
        answer_text: list[str] = []
        usage, finished = None, False
        request_id = f"lt-{self.run_id}-{level.index}-{session.id}-{turn}"
        start = time.perf_counter()
        try:
            session_id = f"lt-{self.run_id}-{level.index}-{session.id}"  # one conversation, all its turns
            async for chunk in self.client.stream(prompt, max_tokens, request_id, session_id):
                if chunk.num_tokens:
                    record.chunks.append((time.perf_counter() - start, chunk.num_tokens))
                if chunk.token_ids is not None:
                    if answer_ids is not None:
                        answer_ids += chunk.token_ids
                elif chunk.num_tokens:
                    answer_ids = None  # text without ids: the ids come from the tokenizer, if any
                answer_text.append(chunk.text)
                usage = chunk.usage or usage
                if chunk.finished:
                    finished, record.finish_reason = True, chunk.finish_reason
            if not finished:
                raise RequestError("incomplete", "the stream ended before the request finished")
        except RequestError as err:
            record.error, record.error_message = err.kind, err.message
        record.end_s = time.perf_counter() - start
        record.output_tokens = sum(n for _, n in record.chunks)
        if usage is not None:
            record.cached_tokens = usage.cached_tokens
            if usage.completion_tokens is not None:
                record.output_tokens = usage.completion_tokens
            if self.codec.text and usage.prompt_tokens is not None:
                record.prompt_tokens = usage.prompt_tokens
        level.records.append(record)
        if level.bar is not None:
            level.errors += not record.ok
            level.bar.set_postfix(errors=level.errors, refresh=False)
            level.bar.update(1)
        if not record.ok:
            return None
        answer = self.codec.answer(answer_ids, "".join(answer_text))
        if not self.codec.text:
            if level.prefix_index is not None:
                level.prefix_index.add(prompt + answer[:-1])  # the last answer token was never computed
            if self.hasher is not None:
                level.trace.append({"timestamp": round(record.start_s * 1000), "input_length": len(prompt),
                                    "output_length": record.output_tokens, "hash_ids": self.hasher.hash_ids(prompt)})
        return answer

    # ---- sessions -----------------------------------------------------------------------------------------
    def _skip(self, level: _Level, reason: str, count: int) -> None:
        level.not_sent[reason] += count
        if level.bar is not None and count:
            level.bar.update(count)

    async def _run_session(self, level: _Level, session: Session, history: Prompt) -> None:
        spawned: list[asyncio.Task] = []
        for k, turn in enumerate(session.turns):
            think = turn.think_s * self.config.think_time_scale if (k or session.parent is not None) else 0.0
            if think > 0:
                await asyncio.sleep(think)  # the workload's tool/user time, not synchronisation
            if level.past_deadline():
                self._skip(level, "deadline", self._unsent(session, k, k))
                break
            new = expand(turn.add, self.workload.vocab_size, level.salt)
            prompt = history + self.codec.new_tokens(new)
            answer = await self._send(level, session, k, prompt)
            if answer is None:
                self._skip(level, "after_error", self._unsent(session, k + 1, k))
                break
            history = prompt + answer
            spawned += [asyncio.create_task(self._run_session(level, child, history))
                        for child in self.children.get((session.id, k), [])]
        await asyncio.gather(*spawned)

    async def _closed_loop(self, level: _Level, concurrency: int) -> None:
        queue = list(reversed(self.roots))

        async def conversation_slot(slot: int) -> None:
            delay = level.clock_zero + slot * self.config.ramp_s / concurrency - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the ramp: this slot's first arrival, not synchronisation
            while queue:
                root = queue.pop()
                if level.past_deadline():
                    self._skip(level, "deadline", self.turns_below[root.id])
                    continue
                await self._run_session(level, root, self.codec.empty())

        await asyncio.gather(*(conversation_slot(i) for i in range(concurrency)))

    def _arrivals(self, rate: float | None, level_index: int) -> list[float]:
        if rate is None:
            if not self.workload.timed:
                raise RunError("this workload has no timestamps: give the open loop a --rate")
            first = min((s.start_s for s in self.roots), default=0.0)
            return [(s.start_s - first) / self.config.speedup for s in self.roots]
        rng = random.Random(self.config.seed * 1000 + level_index)
        t, out = 0.0, []
        for _ in self.roots:
            out.append(t)
            t += rng.expovariate(rate)
        return out

    async def _open_loop(self, level: _Level, rate: float | None) -> None:
        tasks = []
        order = sorted(zip(self._arrivals(rate, level.index), self.roots, strict=True), key=lambda a: a[0])
        for at, root in order:
            delay = level.clock_zero + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival process
            if level.past_deadline():
                self._skip(level, "deadline", self.turns_below[root.id])
                continue
            tasks.append(asyncio.create_task(self._run_session(level, root, self.codec.empty())))
        await asyncio.gather(*tasks)

    @staticmethod
    async def _watch_event_loop(lags: list[float], done: asyncio.Event, period_s: float = 0.01) -> None:
        """How late the client's event loop wakes up: when this grows, the client, not the server, is slow."""
        while not done.is_set():
            start = time.perf_counter()
            try:
                await asyncio.wait_for(done.wait(), period_s)
            except TimeoutError:
                lags.append(max(0.0, time.perf_counter() - start - period_s))

    async def run_level(self, index: int, level_spec: dict) -> dict:
        from tqdm import tqdm

        clock_zero = time.perf_counter()
        deadline = clock_zero + self.config.max_duration_s if self.config.max_duration_s else None
        level = _Level(index, self.config.salt + index, clock_zero, deadline)
        if self.config.prompt_format == "ids":
            level.prefix_index = PrefixIndex(self.reuse_block)
        label = ", ".join(f"{k} {v}" for k, v in level_spec.items() if v is not None) or "trace timestamps"
        total = sum(self.turns_below[r.id] for r in self.roots)
        level.bar = tqdm(total=total, desc=label, unit="req", disable=not self.config.progress, dynamic_ncols=True)
        poller = Poller(list(self.config.metrics_urls), self.config.scrape_interval_s, clock_zero)
        if self.config.metrics_urls:
            await poller.start()
        lags: list[float] = []
        done = asyncio.Event()
        watcher = asyncio.create_task(self._watch_event_loop(lags, done))
        try:
            if self.config.mode == "closed":
                await self._closed_loop(level, level_spec["concurrency"])
            else:
                await self._open_loop(level, level_spec["rate"])
        finally:
            duration = time.perf_counter() - clock_zero
            done.set()
            await watcher
            level.bar.close()
            pods = await poller.stop() if self.config.metrics_urls else []
        records = sorted(level.records, key=lambda r: r.start_s)
        ramp = self.config.ramp_s
        steady = [r for r in records if r.start_s >= ramp]
        result = {
            **level_spec, "salt": level.salt,
            "summary": summarize(steady, max(duration - ramp, 1e-9), self.config.decode_floor_tok_s),
            "not_sent": dict(level.not_sent),
            **({"ramp_s": ramp, "summary_with_ramp": summarize(records, duration, self.config.decode_floor_tok_s)}
               if ramp else {}),
            "client_loop_lag_ms": distribution([lag * 1e3 for lag in lags]),
            "pods": [p.to_json() for p in pods],
            "requests": [r.to_json() for r in records],
        }
        if level.trace:
            result["trace"] = sorted(level.trace, key=lambda r: r["timestamp"])
        return result


def _write_trace(path: str, records: list[dict]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


async def run(config: RunConfig, workload: Workload, client: Client | None = None) -> dict:
    """Runs every level of ``config`` against its target (through ``client``, by default the one ``config``
    names); returns the results, also written to ``config.out``."""
    client = client or make_client(config)
    await client.start()
    try:
        try:
            server = await client.model_info()
        except RequestError as err:
            raise RunError(f"cannot reach {config.target}: {err}") from None
        vocab = server.get("vocab_size")
        if vocab and workload.vocab_size > vocab and config.prompt_format == "ids":
            raise RunError(f"the workload draws tokens from a vocabulary of {workload.vocab_size}, the server's has "
                           f"{vocab}: generate it with --vocab-size {vocab}")
        runner = Runner(config, workload, client, server.get("page_size", 0))
        results = {
            "benchmark": "loadtest", "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": {**asdict(config), "api_key": "***" if config.api_key else None},  # no secret in results
            "reuse_block": runner.reuse_block, "workload": workload.header(), "server": server, "levels": [],
        }
        for index, spec in enumerate(config.levels):
            log.info("level %d: %s", index, spec)
            level = await runner.run_level(index, spec)
            trace = level.pop("trace", None)
            if trace is not None and config.record_trace:
                path = config.record_trace if len(config.levels) == 1 else f"{config.record_trace}.level{index}"
                _write_trace(path, trace)
            results["levels"].append(level)
    finally:
        await client.close()
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results
