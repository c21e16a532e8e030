"""A request, its sampling parameters, and what the engine reports back for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class InvalidRequestError(ValueError):
    """The request can never be served as asked; the message says why (maps to INVALID_ARGUMENT / 400)."""


class OverloadedError(RuntimeError):
    """The waiting queue is full: refused at once rather than queued without bound (maps to
    RESOURCE_EXHAUSTED / 429); the same request may succeed later."""


# Temperatures below this sample greedily: dividing logits by a temperature near 0 (1e-38) overflows to inf,
# and the draw then returns token 0 instead of the argmax. The limit of the argmax is the argmax (vLLM's cut).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # HF semantics, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before the match
    ignore_eos: bool = False
    logprobs: bool = False  # report the log-probability of each chosen token
    detokenize: bool = True  # off: token ids only (a router makes the text and applies stop strings itself)

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (self.detokenize or not self.stop, "stop strings need detokenization (skip_detokenize is set)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestStatus(enum.Enum):
    """Where a request is in its life. One state at a time; ``Request.move_to`` allows only the transitions
    in ``_TRANSITIONS``, so a path nobody designed (memory reused while a prefill pod may still write it,
    a finished request scheduled again) fails loudly where it happens instead of corrupting a stream."""

    WAITING = "waiting"  # queued (new, preempted, or back from a failed remote prefill); holds no memory
    RUNNING = "running"  # holds pages and a working slot, computed by this engine
    # Decode pod: pages and slots reserved, a prefill pod computes the prompt and writes them (compute and
    # transfer are one state here: either way that pod may write the memory at any moment).
    REMOTE_PREFILL = "remote_prefill"
    # Decode pod: cancelled while its prefill pod may still write; the memory is kept until that pod has
    # answered or confirmed it stopped (then freed) or is declared unreachable (then quarantined).
    ABORTING = "aborting"
    # Prefill pod: computed; its pages and slots are kept while they are written to a decode pod.
    HANDING_OVER = "handing_over"
    FINISHED = "finished"  # done or aborted; its memory is back in the pools, the cache or quarantine


_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.WAITING: frozenset({RequestStatus.RUNNING, RequestStatus.REMOTE_PREFILL, RequestStatus.FINISHED}),
    RequestStatus.RUNNING: frozenset({
        RequestStatus.WAITING,  # preempted
        RequestStatus.HANDING_OVER,  # a prefill pod's request, computed
        RequestStatus.FINISHED,
    }),
    RequestStatus.REMOTE_PREFILL: frozenset({
        RequestStatus.RUNNING,  # the prefill pod wrote everything and sent the first token
        RequestStatus.WAITING,  # it failed: memory freed (it confirmed) or quarantined, prefill again
        RequestStatus.ABORTING,  # the client left
    }),
    RequestStatus.ABORTING: frozenset({RequestStatus.FINISHED}),
    RequestStatus.HANDING_OVER: frozenset({RequestStatus.FINISHED}),
    RequestStatus.FINISHED: frozenset(),
}

# States in which a prefill pod may write into the request's reserved memory (decode side).
REMOTE_WRITABLE = frozenset({RequestStatus.REMOTE_PREFILL, RequestStatus.ABORTING})
_STREAM_ENDED = frozenset({RequestStatus.FINISHED, RequestStatus.HANDING_OVER, RequestStatus.ABORTING})


class IllegalTransitionError(RuntimeError):
    """A request was moved along a path the lifecycle does not allow: a bug in the caller."""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_tokens
    ABORT = "abort"  # cancelled by the client


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    _status: RequestStatus = field(default=RequestStatus.WAITING, repr=False)
    finish_reason: FinishReason | None = None
    # Tokens whose KV pages / GDN state are in the cache (the next forward starts here).
    num_computed_tokens: int = 0
    # Of the prompt, tokens served from the prefix cache instead of computed.
    num_cached_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)
    state_slot: int | None = None  # the working slot: this request's GDN state, written every step
    # Prefix cache bookkeeping: chained hashes of the full pages of all_token_ids, the deepest tree node
    # this request holds locked, and its snapshot: a checkpoint slot at a page boundary, published on release
    # (during decode, the last completed page; on a decode pod while a prefill pod computes the prompt, the
    # state at the prompt's resume boundary that the pod writes there; on a prefill pod, that state's source).
    page_hashes: list[int] = field(default_factory=list)
    cache_node: Any = None
    checkpoint_node: Any = None  # the deepest checkpoint on its path that it started from or published
    snapshot_slot: int | None = None
    snapshot_position: int = 0
    num_preemptions: int = 0
    first_token_time: float | None = None
    scheduled_time: float | None = None  # when it first left WAITING (its queue time ends there)
    # Prefill/decode disaggregation (the lifecycle itself is ``status``). Prefill side, an option fixed at
    # creation: when computed, keep pages and slots (HANDING_OVER) until the hand-over is done. Decode side,
    # a routing decision: prefill pods failed this request, so it is prefilled here.
    hold_memory: bool = False
    prefill_locally: bool = False
    # Streaming text bookkeeping (owned by the engine's output processing).
    text: str = ""
    num_text_sent: int = 0
    num_tokens_sent: int = 0

    @property
    def status(self) -> RequestStatus:
        return self._status

    def move_to(self, status: RequestStatus) -> None:
        """Change state; raises IllegalTransitionError for a transition the lifecycle does not allow."""
        if status not in _TRANSITIONS[self._status]:
            raise IllegalTransitionError(
                f"request {self.request_id}: {self._status.value} -> {status.value} is not a legal transition"
            )
        leaves_queue = self._status is RequestStatus.WAITING and status is not RequestStatus.FINISHED
        if leaves_queue and self.scheduled_time is None:
            self.scheduled_time = time.monotonic()
        self._status = status

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode step at 128K context
        wants one token)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """Its stream has ended (its memory may still be held: HANDING_OVER, ABORTING)."""
        return self.status in _STREAM_ENDED


@dataclass
class RequestOutput:
    """What happened to one request in one engine step (deltas), or its final state."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float] | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    error: str | None = None
    queue_time: float | None = None  # arrival in the engine to first scheduled, once known
