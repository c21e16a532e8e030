"""The simulator's workload: agentic users, each running multi-turn conversations back to back.

A user starts at a random moment of the ramp, then runs conversations one after another until the run's
duration is over. A conversation is a long first turn (optionally behind a system prompt every conversation
shares), then 10-15 follow-up turns, each the whole history (every earlier prompt and answer) plus a short new
message (a tool's output); the user thinks (a tool runs) between an answer and the next turn. Defaults follow
the agentic shape the issue names (TokenSpeed's): ~50K-token first turn, 10-15 turns of ~800 new tokens.

Everything a conversation will send (lengths, think times, token ids) depends only on the seed, the user and
the conversation's number, never on timing, so every policy replays the same conversations (when each turn is
sent depends on when the previous answer came back: a closed loop, as a real agent runs).

Token scale: at 1,000 workers a turn-by-turn replay of 50K-token prompts through real radix trees is too slow
for Python, so a simulated token may stand for ``token_scale`` real ones (a simulated page of 16 tokens is then
16 x scale real tokens). Lengths are divided by the scale when generated and multiplied back in every report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from services.common.page_hash import extend_page_hashes

# Token ids stay below 256: CPython shares those int objects, so a history of 100K tokens costs a list of
# pointers and nothing more. Page hashes chain content and depth, so distinct pages still hash apart.
_VOCAB = 256


@dataclass(frozen=True)
class TraceConfig:
    first_turn_tokens: int = field(default=50_000, metadata={"help": "mean length of a conversation's first prompt"})
    first_turn_spread: float = field(default=0.2, metadata={"help": "first turns vary uniformly by +- this fraction"})
    min_follow_ups: int = field(default=10, metadata={"help": "fewest turns after the first"})
    max_follow_ups: int = field(default=15, metadata={"help": "most turns after the first"})
    follow_up_tokens: int = field(default=800, metadata={"help": "mean new tokens a follow-up turn adds"})
    follow_up_spread: float = field(default=0.25, metadata={"help": "follow-ups vary uniformly by +- this"})
    answer_tokens: int = field(default=500, metadata={"help": "mean answer length"})
    answer_spread: float = field(default=0.4, metadata={"help": "answers vary uniformly by +- this fraction"})
    think_time_s: float = field(default=2.0, metadata={"help": "mean pause between an answer and the next turn"})
    new_task_s: float = field(default=20.0, metadata={"help": "mean pause before a user's next conversation"})
    system_prompt_tokens: int = field(default=0, metadata={"help": "prompt prefix shared by every conversation"})
    ramp_s: float = field(default=20.0, metadata={"help": "users start uniformly over this many seconds"})
    token_scale: int = field(default=16, metadata={"help": "real tokens per simulated token (1: exact)"})

    def __post_init__(self) -> None:
        if self.token_scale < 1:
            raise ValueError(f"token_scale must be >= 1, got {self.token_scale}")
        if not 0 <= self.min_follow_ups <= self.max_follow_ups:
            raise ValueError("need 0 <= min_follow_ups <= max_follow_ups")
        for name in ("first_turn_spread", "follow_up_spread", "answer_spread"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1)")
        if min(self.first_turn_tokens, self.follow_up_tokens, self.answer_tokens) < self.token_scale:
            raise ValueError("turn and answer lengths must be at least one simulated token (token_scale)")
        if self.system_prompt_tokens >= self.first_turn_tokens * (1 - self.first_turn_spread):
            raise ValueError("the system prompt must be shorter than every first turn")
        if min(self.think_time_s, self.new_task_s, self.ramp_s) < 0:
            raise ValueError("think_time_s, new_task_s and ramp_s must be >= 0")

    @property
    def max_request_tokens(self) -> float:
        """The longest prompt + answer a conversation can reach (real tokens): a worker's memory must hold it."""
        answer = self.answer_tokens * (1 + self.answer_spread)
        return (self.first_turn_tokens * (1 + self.first_turn_spread)
                + self.max_follow_ups * (self.follow_up_tokens * (1 + self.follow_up_spread) + answer) + answer)


@dataclass(frozen=True)
class Turn:
    new_tokens: list[int]  # the turn's new message (for the first turn: the whole prompt)
    answer: list[int]  # the answer the model gives (its length is the request's max_tokens)
    think_s: float  # pause after this turn's answer before the next turn


class Conversation:
    """One conversation in simulated tokens: its turns, and the history sent so far with its page hashes
    (extended turn by turn, as the router hashes a growing prompt)."""

    def __init__(self, key: str, user: int, turns: list[Turn], page_size: int) -> None:
        self.key = key  # its session id
        self.user = user
        self.turns = turns
        self.page_size = page_size
        self.history: list[int] = []  # every earlier prompt and answer
        self.hashes: list[int] = []  # page hashes of the full pages of ``history`` + the current turn
        self.turn = 0
        self.worker: int | None = None  # the oracle's sticky worker
        self.last_worker: int | None = None  # the worker that served the previous turn (every policy)

    @property
    def done(self) -> bool:
        return self.turn >= len(self.turns)

    def prompt(self) -> list[int]:
        """The current turn's prompt (history + new message); hashes extended to cover it."""
        prompt = self.history + self.turns[self.turn].new_tokens
        extend_page_hashes(self.hashes, prompt, self.page_size)
        return prompt

    def finish_turn(self, prompt: list[int]) -> float:
        """The current turn's answer came back: it joins the history. Returns the think time before the next."""
        turn = self.turns[self.turn]
        self.history = prompt + turn.answer
        self.turn += 1
        return turn.think_s


class Users:
    """The agentic workload: ``num_users`` users, each user's conversations generated on demand, deterministically."""

    def __init__(self, config: TraceConfig, seed: int, page_size: int, num_users: int) -> None:
        self.config = config
        self.seed = seed
        self.page_size = page_size
        self.num_users = num_users
        scale = config.token_scale
        self.system_prompt = self._tokens(np.random.default_rng([seed, 1 << 30]),
                                          config.system_prompt_tokens // scale)

    def start_time(self, user: int) -> float:
        return float(np.random.default_rng([self.seed, user, 1 << 31]).uniform(0.0, self.config.ramp_s))

    def conversation(self, user: int, number: int) -> Conversation | None:
        c, scale = self.config, self.config.token_scale
        rng = np.random.default_rng([self.seed, user, number])

        def length(mean: int, spread: float) -> int:
            real = mean * (1 + spread * (2 * rng.random() - 1))
            return max(1, round(real / scale))

        num_follow_ups = int(rng.integers(c.min_follow_ups, c.max_follow_ups + 1))
        first = length(c.first_turn_tokens, c.first_turn_spread)
        turns = [Turn(self.system_prompt + self._tokens(rng, max(1, first - len(self.system_prompt))),
                      self._tokens(rng, length(c.answer_tokens, c.answer_spread)),
                      float(rng.exponential(c.think_time_s)) if c.think_time_s else 0.0)]
        for _ in range(num_follow_ups):
            turns.append(Turn(self._tokens(rng, length(c.follow_up_tokens, c.follow_up_spread)),
                              self._tokens(rng, length(c.answer_tokens, c.answer_spread)),
                              float(rng.exponential(c.think_time_s)) if c.think_time_s else 0.0))
        # After its last answer the user moves on to a new task: a longer pause.
        pause = float(rng.exponential(c.new_task_s)) if c.new_task_s else 0.0
        turns[-1] = dataclasses.replace(turns[-1], think_s=pause)
        return Conversation(f"user{user}-conv{number}", user, turns, self.page_size)

    @staticmethod
    def _tokens(rng: np.random.Generator, n: int) -> list[int]:
        return rng.integers(0, _VOCAB, n).tolist()


class ScriptedUsers:
    """Hand-written conversations (tests, worked examples): user ``u`` starts at ``starts[u]`` and runs the
    conversations ``conversations[u]`` (each a list of turns) one after another, then stops."""

    def __init__(self, conversations: list[list[list[Turn]]], starts: list[float], page_size: int,
                 system_prompt: list[int] | None = None) -> None:
        if len(conversations) != len(starts):
            raise ValueError("one start time per user")
        self.conversations = conversations
        self.starts = starts
        self.page_size = page_size
        self.num_users = len(starts)
        self.system_prompt = system_prompt or []

    def start_time(self, user: int) -> float:
        return self.starts[user]

    def conversation(self, user: int, number: int) -> Conversation | None:
        if number >= len(self.conversations[user]):
            return None
        return Conversation(f"user{user}-conv{number}", user, self.conversations[user][number], self.page_size)
