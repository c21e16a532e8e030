"""Agentic multi-turn workload: conversations whose every turn resends the whole history.

Each conversation starts with a long first turn (optionally behind a system prompt shared by all
conversations); each later turn is the previous prompt + the model's previous answer + a short new
message (tool output, user text). This is the shape Baton is built for: almost every prompt token was
seen before, by the same conversation.

``reusable_tokens`` says how much of a prompt could be served from cache *in principle*: the longest
prefix it shares with the computed tokens of any request that finished before it was sent, capped so
that the last prompt token is still computed (its logits are needed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Conversation:
    conversation_id: int
    first_turn: list[int]
    follow_ups: list[list[int]]
    # Filled as the conversation runs:
    history: list[int] = field(default_factory=list)  # prompt + answer of the last finished turn
    turn: int = 0

    def next_prompt(self) -> list[int] | None:
        if self.turn == 0:
            return list(self.first_turn)
        if self.turn > len(self.follow_ups):
            return None
        return self.history + self.follow_ups[self.turn - 1]

    def finish_turn(self, prompt: list[int], answer: list[int]) -> None:
        self.history = prompt + answer
        self.turn += 1


def agentic_trace(
    num_conversations: int,
    first_turn_tokens: int,
    num_follow_ups: int,
    follow_up_tokens: int,
    vocab_size: int,
    seed: int = 0,
    system_prompt_tokens: int = 0,
) -> list[Conversation]:
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    system = tokens(system_prompt_tokens)
    return [
        Conversation(i, system + tokens(first_turn_tokens - system_prompt_tokens),
                     [tokens(follow_up_tokens) for _ in range(num_follow_ups)])
        for i in range(num_conversations)
    ]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_tokens(prompt: Sequence[int], computed_before: Sequence[Sequence[int]]) -> int:
    best = max((common_prefix(prompt, seq) for seq in computed_before), default=0)
    return min(best, len(prompt) - 1)
