"""One simulation's configuration: the cluster, the router's policy and weights, the engine's memory settings and
the workload. Engine settings are given in real tokens, as the engine takes them, and converted to simulated
tokens with the trace's token scale."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.router.policy import Weights

from .router import POLICIES
from .trace import TraceConfig
from .worker import WorkerConfig


@dataclass(frozen=True)
class SimConfig:
    workers: int = field(default=64, metadata={"help": "decode workers (each with its prefill capacity)"})
    policy: str = field(default="cache_aware", metadata={"help": f"one of {', '.join(POLICIES)}"})
    # cache_aware's weights; defaults: the router's (services/router/policy.py)
    weight_cache: float = field(default=Weights.cache, metadata={"help": "cost per prompt token not reused"})
    weight_queue: float = field(default=Weights.queue, metadata={"help": "cost per prompt token queued"})
    weight_request: float = field(default=Weights.request, metadata={"help": "cost per request on the worker"})
    weight_session: float = field(default=Weights.session, metadata={"help": "cost per other live conversation"})
    weight_memory: float = field(
        default=Weights.memory, metadata={"help": "cost per live history token pushed past a worker's cache"}
    )
    session_ttl_s: float = field(default=10.0, metadata={"help": "router: a conversation silent this long is over"})
    session_ids: bool = field(default=True, metadata={"help": "requests carry their conversation's id"})
    session_end_signal: bool = field(
        default=False, metadata={"help": "what-if: clients tell the router when a conversation is over"}
    )
    users_per_worker: float = field(default=4.0, metadata={"help": "agentic users (concurrent conversations)"})
    duration_s: float = field(default=120.0, metadata={"help": "users send no turn after this (simulated s)"})
    warmup_s: float = field(default=40.0, metadata={"help": "metrics cover requests sent from here to the end"})
    seed: int = field(default=0, metadata={"help": "the workload's seed (the same for every policy)"})
    cache_tokens: int = field(default=1_000_000, metadata={"help": "KV capacity of a worker in tokens"})
    checkpoint_slots: int = field(default=128, metadata={"help": "GDN checkpoint slots of a worker (engine: 2 x 64)"})
    max_num_seqs: int = field(default=64, metadata={"help": "requests running at once on a worker"})
    max_waiting: int = field(default=256, metadata={"help": "requests queued beyond those (router capacity)"})
    page_size: int = field(default=16, metadata={"help": "tokens per KV page, in simulated tokens"})
    checkpoint_interval: int = field(default=128, metadata={"help": "engine: tokens between prefill checkpoints"})
    prefill_chunk_size: int = field(default=8192, metadata={"help": "engine: prompt tokens per prefill step"})
    remote_prefill_threshold: int = field(default=512, metadata={"help": "uncached prompts this long go remote"})
    handover_resume_checkpoint: bool = field(
        default=True, metadata={"help": "engine: prefill pods hand over the state at the prompt's last page boundary"}
    )
    poll_interval_s: float = field(default=0.1, metadata={"help": "router: period of its reads of the event streams"})
    retry_after_s: float = field(default=1.0, metadata={"help": "a refused turn is sent again after this long"})
    decode_calibration: str = field(default="", metadata={"help": "batched-decode benchmark JSON (default: H200)"})
    prefill_calibration: str = field(default="", metadata={"help": "prefill benchmark JSON (default: H200)"})
    trace: TraceConfig = field(default_factory=TraceConfig, metadata={"flatten": True})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        self.weights  # noqa: B018  (validates them)
        if self.workers < 1 or self.users_per_worker <= 0:
            raise ValueError("need at least one worker and a positive number of users per worker")
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError("need 0 <= warmup_s < duration_s")
        for name in ("page_size", "max_num_seqs", "checkpoint_slots", "prefill_chunk_size", "checkpoint_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.cache_tokens < self.trace.max_request_tokens:
            raise ValueError(f"cache_tokens {self.cache_tokens} cannot hold the longest request of the workload "
                             f"({self.trace.max_request_tokens:.0f} tokens): a worker could never admit it")

    @property
    def weights(self) -> Weights:
        return Weights(self.weight_cache, self.weight_queue, self.weight_request, self.weight_session,
                       self.weight_memory)

    @property
    def num_users(self) -> int:
        return max(1, round(self.users_per_worker * self.workers))

    @property
    def worker_config(self) -> WorkerConfig:
        scale, page = self.trace.token_scale, self.page_size
        # The checkpoint interval must stay a multiple of the page (the engine requires it): at least one page.
        interval = max(page, round(self.checkpoint_interval / scale / page) * page)
        return WorkerConfig(
            page_size=page, num_pages=self.cache_tokens // (page * scale), num_checkpoint_slots=self.checkpoint_slots,
            max_num_seqs=self.max_num_seqs, checkpoint_interval=interval,
            prefill_chunk_size=max(1, self.prefill_chunk_size // scale),
            remote_prefill_threshold=-(-self.remote_prefill_threshold // scale),
            handover_resume_checkpoint=self.handover_resume_checkpoint, token_scale=scale,
        )
