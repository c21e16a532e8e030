"""Workload generators (seedable, sizes by arguments) and the Mooncake trace format in both directions.

- ``agentic``: TokenSpeed's agentic shape: a long first turn (~50K tokens), then 10-15 turns that each resend
  the whole history (prompt + the model's answer) plus ~800 new tokens (a tool result), after a think time.
- ``shared_prefix``: single-turn requests behind one of a few long system prompts (optionally Zipf-popular).
- ``subagents``: an orchestrator reads one long context; sub-agents branch from its context and answer
  (``Session.parent``), each running a few turns of its own.
- ``from_mooncake`` / ``to_mooncake``: the FAST'25 Mooncake trace format (``timestamp`` ms, ``input_length``,
  ``output_length``, ``hash_ids`` of chained 512-token blocks), also used by its tool-agent trace.

Lengths given as ``x`` with ``jitter`` j are drawn uniformly from ``[x(1-j), x(1+j)]``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtest.tokens import BlockHasher, seeded_tokens
from loadtest.workload import HashBlocks, SeededTokens, Session, Turn, Workload, WorkloadError, expand


def _length(rng: random.Random, mean: int, jitter: float) -> int:
    if jitter <= 0:
        return mean
    return max(1, round(rng.uniform(mean * (1 - jitter), mean * (1 + jitter))))


def _think(rng: random.Random, mean_s: float) -> float:
    """Exponential think time: tool calls are mostly quick with a long tail."""
    return round(rng.expovariate(1 / mean_s), 3) if mean_s > 0 else 0.0


def agentic(
    conversations: int, vocab_size: int, *, first_turn_tokens: int = 50_000, follow_ups: tuple[int, int] = (10, 15),
    turn_tokens: int = 800, output_tokens: int = 300, think_time_s: float = 5.0, system_prompt_tokens: int = 0,
    jitter: float = 0.2, seed: int = 0,
) -> Workload:
    """Multi-turn agent conversations; ``system_prompt_tokens`` of the first turn are shared by all."""
    if system_prompt_tokens >= first_turn_tokens * (1 - jitter):
        raise ValueError("the system prompt must be shorter than the shortest first turn")
    lo, hi = follow_ups
    if not 0 <= lo <= hi:
        raise ValueError(f"follow_ups must be 0 <= min <= max, got {follow_ups}")
    rng = random.Random(seed)
    system = [SeededTokens(f"{seed}/system", system_prompt_tokens)] if system_prompt_tokens else []
    sessions = []
    for c in range(conversations):
        first = _length(rng, first_turn_tokens, jitter) - system_prompt_tokens
        turns = [Turn((*system, SeededTokens(f"{seed}/c{c}/t0", first)), _length(rng, output_tokens, jitter))]
        for t in range(1, rng.randint(lo, hi) + 1):
            turns.append(Turn((SeededTokens(f"{seed}/c{c}/t{t}", _length(rng, turn_tokens, jitter)),),
                              _length(rng, output_tokens, jitter), _think(rng, think_time_s)))
        sessions.append(Session(c, tuple(turns)))
    params = {"conversations": conversations, "first_turn_tokens": first_turn_tokens, "follow_ups": list(follow_ups),
              "turn_tokens": turn_tokens, "output_tokens": output_tokens, "think_time_s": think_time_s,
              "system_prompt_tokens": system_prompt_tokens, "jitter": jitter, "seed": seed}
    return Workload("agentic", vocab_size, sessions, params=params)


def shared_prefix(
    requests: int, vocab_size: int, *, system_prompts: int = 4, system_prompt_tokens: int = 4000,
    user_tokens: int = 400, output_tokens: int = 200, zipf: float = 0.0, jitter: float = 0.2, seed: int = 0,
) -> Workload:
    """Independent single-turn requests, each behind one of ``system_prompts`` shared prompts; prompt k is
    chosen with weight 1/(k+1)^zipf (0: uniformly)."""
    if system_prompts < 1:
        raise ValueError("system_prompts must be >= 1")
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** zipf for k in range(system_prompts)]
    sessions = []
    for r in range(requests):
        k = rng.choices(range(system_prompts), weights)[0]
        add = (SeededTokens(f"{seed}/system{k}", system_prompt_tokens),
               SeededTokens(f"{seed}/r{r}", _length(rng, user_tokens, jitter)))
        sessions.append(Session(r, (Turn(add, _length(rng, output_tokens, jitter)),)))
    params = {"requests": requests, "system_prompts": system_prompts, "system_prompt_tokens": system_prompt_tokens,
              "user_tokens": user_tokens, "output_tokens": output_tokens, "zipf": zipf, "jitter": jitter,
              "seed": seed}
    return Workload("shared_prefix", vocab_size, sessions, params=params)


def subagents(
    trees: int, vocab_size: int, *, context_tokens: int = 40_000, subagents_per_tree: int = 8,
    task_tokens: int = 500, subagent_turns: int = 3, turn_tokens: int = 800, output_tokens: int = 300,
    think_time_s: float = 2.0, jitter: float = 0.2, seed: int = 0,
) -> Workload:
    """Per tree: an orchestrator turn over a long context, then ``subagents_per_tree`` sub-agents that start
    from the orchestrator's prompt and answer, each adding its task and running ``subagent_turns`` turns."""
    if subagent_turns < 1:
        raise ValueError("subagent_turns must be >= 1")
    rng = random.Random(seed)
    sessions, next_id = [], 0
    for tree in range(trees):
        root = next_id
        context = SeededTokens(f"{seed}/tree{tree}/context", _length(rng, context_tokens, jitter))
        sessions.append(Session(root, (Turn((context,), _length(rng, output_tokens, jitter)),)))
        next_id += 1
        for a in range(subagents_per_tree):
            turns = [Turn((SeededTokens(f"{seed}/tree{tree}/agent{a}/task", _length(rng, task_tokens, jitter)),),
                          _length(rng, output_tokens, jitter), _think(rng, think_time_s))]
            for t in range(1, subagent_turns):
                add = SeededTokens(f"{seed}/tree{tree}/agent{a}/t{t}", _length(rng, turn_tokens, jitter))
                turns.append(Turn((add,), _length(rng, output_tokens, jitter), _think(rng, think_time_s)))
            sessions.append(Session(next_id, tuple(turns), parent=(root, 0)))
            next_id += 1
    params = {"trees": trees, "context_tokens": context_tokens, "subagents_per_tree": subagents_per_tree,
              "task_tokens": task_tokens, "subagent_turns": subagent_turns, "turn_tokens": turn_tokens,
              "output_tokens": output_tokens, "think_time_s": think_time_s, "jitter": jitter, "seed": seed}
    return Workload("subagents", vocab_size, sessions, params=params)


# ---- realising a workload offline ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Realized:
    """One request of a workload with its prompt made concrete."""

    session: int
    turn: int
    time_s: float  # arrival + think times, with no service time
    prompt: list[int]
    max_tokens: int


def placeholder_answer(session: int, turn: int, length: int, vocab_size: int) -> list[int]:
    """What stands in for the server's answer when a workload is realised without a server."""
    return seeded_tokens(f"answer/{session}/{turn}", length, vocab_size)


def realize(workload: Workload, salt: int = 0,
            answer: Callable[[int, int, int, int], list[int]] = placeholder_answer) -> Iterator[Realized]:
    """Every request of ``workload``, sessions in file order, each prompt built as the runner builds it
    (history + new tokens; history = prompt + answer), with ``answer(session, turn, max_tokens, vocab)`` for
    the server's answers. Times add think times to arrivals as if every answer came at once."""
    end_of_turn: dict[tuple[int, int], tuple[float, list[int]]] = {}  # (session, turn) -> (time, history after)
    for s in workload.sessions:
        if s.parent is None:
            time_s, history = s.start_s, []
        else:
            time_s, history = end_of_turn[s.parent]
        for k, turn in enumerate(s.turns):
            if k or s.parent is not None:
                time_s += turn.think_s
            prompt = history + expand(turn.add, workload.vocab_size, salt)
            yield Realized(s.id, k, time_s, prompt, turn.max_tokens)
            history = prompt + answer(s.id, k, turn.max_tokens, workload.vocab_size)
            end_of_turn[(s.id, k)] = (time_s, history)


# ---- Mooncake trace format ----------------------------------------------------------------------------------

def from_mooncake(path: str | Path, vocab_size: int, *, block_size: int = 512, trace_key: str = "mooncake",
                  limit: int | None = None) -> Workload:
    """A Mooncake trace as a timed workload: one single-turn session per record, arriving at its timestamp,
    whose prompt is its blocks (block h = ``seeded_tokens(f"{trace_key}/block/{h}")``, the last one cut to
    ``input_length``)."""
    sessions = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(sessions) >= limit:
                break
            try:
                record = json.loads(line)
                hash_ids = tuple(int(h) for h in record["hash_ids"])
                blocks = HashBlocks(trace_key, hash_ids, int(record["input_length"]), block_size)
                session = Session(len(sessions), (Turn((blocks,), int(record["output_length"])),),
                                  start_s=float(record["timestamp"]) / 1000)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise WorkloadError(f"{path}:{number}: not a Mooncake trace record ({err})") from None
            sessions.append(session)
    params = {"trace": str(path), "block_size": block_size, "trace_key": trace_key, "records": len(sessions)}
    return Workload("mooncake", vocab_size, sessions, timed=True, params=params)


def to_mooncake(workload: Workload, path: str | Path, *, block_size: int = 512, salt: int = 0) -> int:
    """Writes ``workload`` as a Mooncake trace (records in arrival order); returns the number of records.

    Prompts are realised with placeholder answers (``realize``), cut into ``block_size`` blocks and hashed
    chained; hash ids are numbered in order of first appearance, as in the published traces, so a trace read
    with ``from_mooncake`` and written back is the same trace.
    """
    hasher = BlockHasher(block_size)
    requests = sorted(realize(workload, salt), key=lambda r: r.time_s)  # stable: file order at equal times
    with open(path, "w") as f:
        for r in requests:
            record = {"timestamp": round(r.time_s * 1000), "input_length": len(r.prompt),
                      "output_length": r.max_tokens, "hash_ids": hasher.hash_ids(r.prompt)}
            f.write(json.dumps(record) + "\n")
    return len(requests)
