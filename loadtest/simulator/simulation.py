"""The discrete-event loop: users send turns, the router places them, workers serve them.

Events are (time, order, kind, payload) on one heap. A turn is sent at its time: the router places it (or refuses
it: every worker at capacity; it is sent again after the retry hint); the worker admits it when it can. A worker
asks to be woken at its next completion; a wake-up made stale by a later change is dropped by version. When an
answer comes back the user thinks, then sends the next turn, or starts a new conversation after the last one.
Users send nothing after ``duration_s``; what is in flight then runs to completion.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from pathlib import Path

from services.engine.request import Request, SamplingParams

from .config import SimConfig
from .report import Record, Report, summarize
from .router import ORACLE, SimRouter
from .timing import DEFAULT_DECODE, DEFAULT_PREFILL, TimeModel
from .trace import Conversation, ScriptedUsers, Users
from .worker import SimRequest, SimWorker

_SEND, _WAKE = 0, 1


class Simulation:
    def __init__(self, config: SimConfig, time_model: TimeModel, workload: Users | ScriptedUsers | None = None) -> None:
        self.config = config
        self.time_model = time_model
        self.page_size = config.page_size
        window = (config.warmup_s, config.duration_s)
        worker_config = config.worker_config
        self.workers = [SimWorker(i, worker_config, time_model, window) for i in range(config.workers)]
        self.router = SimRouter(self.workers, config.policy, config.weights, config.page_size,
                                config.trace.token_scale, config.max_num_seqs + config.max_waiting,
                                config.poll_interval_s, config.session_ttl_s)
        self.users = workload or Users(config.trace, config.seed, config.page_size, config.num_users)
        self._heap: list = []
        self._order = itertools.count()
        self._numbers = [0] * self.users.num_users  # conversations each user has started
        self.finished: list[Record] = []
        self.refusals = 0
        self.conversations_started = 0
        self.conversations_finished = 0
        self._any_finished = False
        self._requests = itertools.count()
        # The working set: the histories of live conversations (from their first answer to their last), integrated
        # over the window, so the report can say how the caches compare with what they would need to hold.
        self._live_tokens = 0
        self._live_since = 0.0
        self.live_token_seconds = 0.0
        # The same per worker (a conversation's history counts on the worker of its last turn): what exceeds the
        # worker's cache, integrated, says how evenly placement spread the histories, whatever the eviction order.
        self._cache_size = worker_config.num_pages * config.page_size
        self._live_on = [0] * config.workers
        self._overflow_tokens = 0
        self.overflow_token_seconds = 0.0

    def run(self) -> Report:
        started = time.perf_counter()
        for user in range(self.users.num_users):
            self._start_conversation(user, self.users.start_time(user))
        now = 0.0
        while self._heap:
            now, _, kind, payload = heapq.heappop(self._heap)
            if kind == _SEND:
                self._send(*payload, now)
            else:
                worker, version = payload
                if version == worker.version:
                    worker.scheduled = math.inf
                    for sim in worker.advance(now):
                        self._answered(sim, now)
                    self._after(worker, now)
        for worker in self.workers:
            worker.close(max(now, self.config.duration_s))
        self._live_changed(max(now, self.config.duration_s), [])
        self.router.flush()
        return summarize(self, time.perf_counter() - started)

    # ---- users --------------------------------------------------------------------------------------
    def _start_conversation(self, user: int, t: float) -> None:
        """The user's next conversation starts at ``t`` (unless the user has no more)."""
        conversation = self.users.conversation(user, self._numbers[user])
        self._numbers[user] += 1
        if conversation is not None:
            self._push(t, _SEND, (conversation, None))

    def _send(self, conversation: Conversation, sent_at: float | None, now: float) -> None:
        """Send the conversation's current turn; ``sent_at``: when it was first sent, if it was refused then."""
        if now > self.config.duration_s and sent_at is None:
            return  # the user stops
        first = conversation.turn == 0
        if first and sent_at is None:
            self.conversations_started += 1
        prompt = conversation.prompt()
        page = self.page_size
        hashes = conversation.hashes[: len(prompt) // page]
        turn = conversation.turns[conversation.turn]
        sticky = self.workers[conversation.worker] if conversation.worker is not None else None
        session_id = conversation.key if self.config.session_ids else ""
        placed = self.router.place(len(prompt), hashes, session_id, now, sticky, conversation.last_worker)
        worker = placed.worker
        if worker is None:
            self.refusals += 1
            self._push(now + self.config.retry_after_s, _SEND, (conversation, now if sent_at is None else sent_at))
            return
        if self.config.policy == ORACLE and first:
            conversation.worker = worker.index
            self.router.live_conversations[worker.index] += 1
        request = Request(f"r{next(self._requests)}", prompt,
                          SamplingParams(max_tokens=len(turn.answer), temperature=0.0, ignore_eos=True),
                          arrival_time=now, page_hashes=list(hashes))
        previous = conversation.last_worker
        sim = SimRequest(request, conversation, conversation.turn, turn.answer, now if sent_at is None else sent_at,
                         self._reusable(conversation, len(prompt)), placed.chosen_hit, placed.available_hit,
                         -1 if previous is None else previous, placed.previous_hit)
        worker.submit(sim, now)
        self._after(worker, now)

    def _reusable(self, conversation: Conversation, prompt_len: int) -> int:
        """Tokens of this prompt an earlier finished request computed: the whole history for a follow-up; the shared
        system prompt for a first turn once any request has finished."""
        if conversation.turn > 0:
            shared = len(conversation.history)
        else:
            shared = len(self.users.system_prompt) if self._any_finished else 0
        return min(shared, prompt_len - 1)

    def _answered(self, sim: SimRequest, now: float) -> None:
        self.finished.append(Record.of(sim, self.config.trace.token_scale))
        self._any_finished = True
        conversation = sim.conversation
        self.router.answered(conversation.key, now)
        before, before_on = len(conversation.history), conversation.last_worker
        think = conversation.finish_turn(sim.request.prompt_token_ids)
        conversation.last_worker = sim.worker
        changes = [] if before_on is None else [(before_on, -before)]
        if not conversation.done:
            changes.append((sim.worker, len(conversation.history)))
        self._live_changed(now, changes)
        if conversation.done:
            self.conversations_finished += 1
            if self.config.session_end_signal:
                self.router.session_ended(conversation.key)
            if conversation.worker is not None:
                self.router.live_conversations[conversation.worker] -= 1
            self._start_conversation(conversation.user, now + think)
        else:
            self._push(now + think, _SEND, (conversation, None))

    def _live_changed(self, now: float, changes: list[tuple[int, int]]) -> None:
        """Live history tokens change on workers at ``now``: (worker, delta) each."""
        w0, w1 = self.config.warmup_s, self.config.duration_s
        span = min(now, w1) - max(self._live_since, w0)
        if span > 0:
            self.live_token_seconds += self._live_tokens * span
            self.overflow_token_seconds += self._overflow_tokens * span
        self._live_since = now
        size, live = self._cache_size, self._live_on
        for worker, delta in changes:
            self._overflow_tokens -= max(0, live[worker] - size)
            live[worker] += delta
            self._live_tokens += delta
            self._overflow_tokens += max(0, live[worker] - size)

    # ---- events -------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload) -> None:
        heapq.heappush(self._heap, (t, next(self._order), kind, payload))

    def _after(self, worker: SimWorker, now: float) -> None:
        batch = worker.drain_events()
        if batch is not None:
            self.router.publish(worker, batch, now)
        t = worker.next_time()
        if t != worker.scheduled:
            worker.version += 1
            worker.scheduled = t
            if t < math.inf:
                heapq.heappush(self._heap, (t, next(self._order), _WAKE, (worker, worker.version)))


def run(config: SimConfig, workload: ScriptedUsers | None = None) -> Report:
    """Simulate ``config`` (its agentic workload, or ``workload``) and report."""
    return Simulation(config, time_model(config), workload).run()


def time_model(config: SimConfig) -> TimeModel:
    return TimeModel.from_results(Path(config.decode_calibration or DEFAULT_DECODE),
                                  Path(config.prefill_calibration or DEFAULT_PREFILL))
