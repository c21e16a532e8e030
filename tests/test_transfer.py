"""The Mooncake transfer layer: coalescing, and real engines in separate processes over TCP loopback.

The test process is the prefill side (one sender engine for the module); receivers are "spawn" processes
that register a small KV-pool-shaped buffer, report ``(session_id, base address)`` through a pipe, and dump
the buffer on request. Every page of a fresh pool holds -(page index + 1), so a page nobody wrote is
recognisable.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.transfer.descriptors import coalesce
from services.transfer.engine import TransferConfig, TransferEngine, TransferError
from services.transfer.handover import PoolRegions, handover_regions

NUM_PAGES = 64
PAGE_BYTES = 4096
PAGE_FLOATS = PAGE_BYTES // 4
TIMEOUT_S = 2.0  # the sender's timeout_s: small, so the dead- and hung-peer tests stay quick
PIPE_WAIT_S = 60.0  # generous bound on a receiver's answer (its start imports torch and Mooncake)


def _mooncake_missing() -> str | None:
    try:
        import mooncake.engine  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.timeout(60)  # a hang here is a bug: fail fast instead of at the suite's 600 s
needs_mooncake = pytest.mark.skipif(_mooncake_missing() is not None, reason=f"Mooncake: {_mooncake_missing()}")


# ---- coalesce ---------------------------------------------------------------------------------------------
def _byte_map(src, dst, lengths) -> Counter:
    """Every (source byte, destination byte) pair a descriptor list copies, with multiplicity."""
    return Counter((s + k, d + k) for s, d, n in zip(src, dst, lengths, strict=True) for k in range(n))


def test_coalesce_merges_pages_adjacent_on_both_sides():
    # Source pages 3,4,5 -> destination pages 10,11,12 is one run; 6 -> 20 breaks the destination side,
    # 8 -> 13 breaks the source side; given out of order on purpose.
    pages = [(5, 12), (3, 10), (8, 13), (4, 11), (6, 20)]
    src = [s * PAGE_BYTES for s, _ in pages]
    dst = [d * PAGE_BYTES for _, d in pages]
    out = coalesce(src, dst, [PAGE_BYTES] * len(pages))
    assert out == (
        [3 * PAGE_BYTES, 6 * PAGE_BYTES, 8 * PAGE_BYTES],
        [10 * PAGE_BYTES, 20 * PAGE_BYTES, 13 * PAGE_BYTES],
        [3 * PAGE_BYTES, PAGE_BYTES, PAGE_BYTES],
    )


def test_coalesce_chains_through_a_source_used_twice():
    # Source 0..10 goes to two places; 10..20 continues the second copy only.
    assert coalesce([0, 0, 10], [500, 100, 110], [10, 10, 10]) == ([0, 0], [100, 500], [20, 10])


def test_coalesce_edge_cases():
    assert coalesce([], [], []) == ([], [], [])
    assert coalesce([7], [9], [3]) == ([7], [9], [3])
    assert coalesce([0, 10, 20], [0, 10, 20], [10, 10, 10]) == ([0], [0], [30])
    with pytest.raises(ValueError, match="differ in length"):
        coalesce([0, 1], [0], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        coalesce([0], [0], [0])
    with pytest.raises(ValueError, match="positive"):
        coalesce([0, 8], [0, 8], [8, -8])
    with pytest.raises(ValueError, match="negative"):
        coalesce([-1], [0], [4])


_descriptor = st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(1, 6))


@settings(max_examples=300, deadline=None)
@given(st.lists(_descriptor, max_size=25))
def test_coalesce_copies_the_same_bytes_and_leaves_nothing_mergeable(descriptors):
    src, dst, lengths = (list(x) for x in zip(*descriptors, strict=True)) if descriptors else ([], [], [])
    out_src, out_dst, out_len = coalesce(src, dst, lengths)
    assert _byte_map(out_src, out_dst, out_len) == _byte_map(src, dst, lengths)
    assert len(out_src) <= len(src)
    assert out_src == sorted(out_src)
    assert all(n > 0 for n in out_len)
    # Maximal: no output descriptor starts where another ends on both sides.
    ends = Counter((s + n, d + n) for s, d, n in zip(out_src, out_dst, out_len, strict=True))
    starts = Counter(zip(out_src, out_dst, strict=True))
    assert not set(ends) & set(starts)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=40, unique=True), st.integers(0, 1000))
def test_coalesce_page_runs_become_one_descriptor_each(pages, shift):
    # Pages sent to the same page numbers shifted by a constant: one descriptor per run of consecutive pages.
    src = [p * PAGE_BYTES for p in pages]
    dst = [(p + shift) * PAGE_BYTES for p in pages]
    ordered = sorted(pages)
    runs = 1 + sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b != a + 1)
    out_src, out_dst, out_len = coalesce(src, dst, [PAGE_BYTES] * len(pages))
    assert len(out_src) == runs
    assert sum(out_len) == len(pages) * PAGE_BYTES
    assert [d - s for s, d in zip(out_src, out_dst, strict=True)] == [shift * PAGE_BYTES] * runs


_POOL = PoolRegions(kv_base=1000, kv_num_pages=12, kv_page_bytes=3, num_attn_layers=2, conv_base=200,
                    conv_slot_bytes=2, ssm_base=400, ssm_slot_bytes=5, num_slots=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11)), max_size=12,
                unique_by=(lambda t: t[0], lambda t: t[1])))
def test_handover_regions_copy_every_page_of_every_layer_in_runs(pairs):
    """The hand-over's descriptors copy exactly what one descriptor per page and layer would, with pages
    consecutive on both pods merged (no two left that could be)."""
    src_pages, dst_pages = [s for s, _ in pairs], [d for _, d in pairs]
    src, dst, lengths = handover_regions(_POOL, _POOL, src_pages, dst_pages, [(0, 1), (2, 3)])
    naive = [], [], []
    for layer in range(_POOL.num_attn_layers):
        for s, d in pairs:
            naive[0].append(_POOL.kv_page_address(layer, s))
            naive[1].append(_POOL.kv_page_address(layer, d))
            naive[2].append(_POOL.kv_page_bytes)
    for a, b in ((0, 1), (2, 3)):
        naive[0].extend([_POOL.conv_base + a * 2, _POOL.ssm_base + a * 5])
        naive[1].extend([_POOL.conv_base + b * 2, _POOL.ssm_base + b * 5])
        naive[2].extend([2, 5])
    assert _byte_map(src, dst, lengths) == _byte_map(*naive)
    runs = 1 + sum(1 for (s0, d0), (s1, d1) in zip(sorted(pairs), sorted(pairs)[1:], strict=False)
                   if (s1, d1) != (s0 + 1, d0 + 1)) if pairs else 0
    assert len(lengths) == runs * _POOL.num_attn_layers + 4


# ---- configuration ----------------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="protocol"):
        TransferConfig(protocol="udp")
    with pytest.raises(ValueError, match="timeout_s"):
        TransferConfig(timeout_s=0)
    with pytest.raises(ValueError, match="no port"):
        TransferConfig(hostname="127.0.0.1:15000")


# ---- receivers ----------------------------------------------------------------------------------------------
def _fresh_pool() -> torch.Tensor:
    return (-(torch.arange(NUM_PAGES, dtype=torch.float32) + 1))[:, None].expand(NUM_PAGES, PAGE_FLOATS).contiguous()


def _receiver_main(conn) -> None:
    """A decode pod in miniature: registers a pool, reports where it is, dumps or resets it on request."""
    engine = TransferEngine(TransferConfig())
    try:
        pool = _fresh_pool()
        conn.send((engine.session_id, engine.register(pool)))
        while True:
            command = conn.recv()
            if command == "dump":
                conn.send(pool.numpy().tobytes())
            elif command == "reset":
                pool.copy_(_fresh_pool())
                conn.send("ok")
            else:
                return
    finally:
        engine.close()


class Receiver:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.session = ""
        self.base = 0

    def _recv(self):
        if not self.conn.poll(PIPE_WAIT_S):
            raise TimeoutError(f"receiver pid {self.proc.pid} did not answer")
        return self.conn.recv()

    def ready(self) -> Receiver:
        self.session, self.base = self._recv()
        return self

    def pool(self) -> torch.Tensor:
        self.conn.send("dump")
        return torch.frombuffer(bytearray(self._recv()), dtype=torch.float32).reshape(NUM_PAGES, PAGE_FLOATS)

    def reset(self) -> None:
        self.conn.send("reset")
        assert self._recv() == "ok"

    def page_addr(self, page: int) -> int:
        return self.base + page * PAGE_BYTES

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


@pytest.fixture(scope="module")
def sender():
    """The prefill side: an engine in this process with a registered source pool of random pages."""
    engine = TransferEngine(TransferConfig(timeout_s=TIMEOUT_S))
    src = torch.randn(NUM_PAGES, PAGE_FLOATS, generator=torch.Generator().manual_seed(0))
    base = engine.register(src)
    try:
        yield engine, src, base
    finally:
        engine.close()


@pytest.fixture(scope="module")
def receivers():
    """Receiver processes started together (each start imports torch and Mooncake, ~2 s): the long-lived
    peer first, then spares for the tests that kill or stop theirs."""
    started = [Receiver() for _ in range(3)]
    try:
        yield list(started)  # tests pop spares from this copy; all are stopped here (stop is idempotent)
    finally:
        for receiver in started:
            receiver.stop()


@pytest.fixture(scope="module")
def live(receivers):
    return receivers[0].ready()


@pytest.fixture
def spare(receivers):
    assert len(receivers) > 1, "add a spare to the receivers fixture"
    return receivers.pop().ready()


@pytest.fixture
def peer(live):
    live.reset()
    return live


def _write_pages(engine, base, receiver, pairs) -> int:
    """Write source page s to destination page d for each (s, d), one batch."""
    return engine.write(
        receiver.session,
        [base + s * PAGE_BYTES for s, _ in pairs],
        [receiver.page_addr(d) for _, d in pairs],
        [PAGE_BYTES] * len(pairs),
    )


def _expected(src, pairs) -> torch.Tensor:
    expected = _fresh_pool()
    for s, d in pairs:
        expected[d] = src[s]
    return expected


# ---- engines ------------------------------------------------------------------------------------------------
@needs_mooncake
def test_scattered_pages_land_exactly(sender, peer):
    engine, src, base = sender
    # Scattered destinations with some adjacent runs (2-3-4, 40-41) and sources out of order.
    pairs = [(0, 2), (1, 3), (2, 4), (9, 7), (30, 40), (31, 41), (5, 63), (17, 0), (60, 20)]
    assert _write_pages(engine, base, peer, pairs) == len(pairs) * PAGE_BYTES
    pool = peer.pool()
    assert torch.equal(pool, _expected(src, pairs))  # written pages exact, every other page untouched
    assert engine.session_id != peer.session and engine.session_id.startswith("127.0.0.1:")
    assert engine.write(peer.session, [], [], []) == 0


@needs_mooncake
def test_a_batch_larger_than_mooncakes_tcp_lanes_is_split_and_lands_exactly(sender, peer):
    """Thousands of descriptors (scattered pages x attention layers) in one write: Mooncake's TCP lanes
    reject a batch that large, so write() must cut it into batches of MAX_DESCRIPTORS_PER_BATCH."""
    from services.transfer.engine import MAX_DESCRIPTORS_PER_BATCH

    engine, src, base = sender
    pieces = 3 * MAX_DESCRIPTORS_PER_BATCH + 5  # 16-byte pieces, every other one, so nothing coalesces
    rng = random.Random(3)
    offsets = rng.sample(range(NUM_PAGES * PAGE_BYTES // 32), pieces)
    src_addrs = [base + 32 * o for o in offsets]
    dst_addrs = [peer.base + 32 * o for o in offsets]
    assert engine.write(peer.session, src_addrs, dst_addrs, [16] * pieces) == 16 * pieces
    expected = _fresh_pool().view(torch.uint8).flatten()
    source = src.view(torch.uint8).flatten()
    for o in offsets:
        expected[32 * o : 32 * o + 16] = source[32 * o : 32 * o + 16]
    assert torch.equal(peer.pool().view(torch.uint8).flatten(), expected)


@needs_mooncake
def test_bad_arguments_are_refused_before_reaching_mooncake(sender, peer):
    engine, src, base = sender
    unregistered = torch.zeros(PAGE_FLOATS)
    with pytest.raises(ValueError, match="not inside memory registered"):
        engine.write(peer.session, [unregistered.data_ptr()], [peer.page_addr(0)], [PAGE_BYTES])
    with pytest.raises(ValueError, match="not inside memory registered"):  # runs past the end of the pool
        engine.write(peer.session, [base + (NUM_PAGES - 1) * PAGE_BYTES], [peer.page_addr(0)], [2 * PAGE_BYTES])
    with pytest.raises(ValueError, match="positive"):
        engine.write(peer.session, [base], [peer.page_addr(0)], [0])
    with pytest.raises(ValueError, match="host:port"):
        engine.write("", [base], [peer.page_addr(0)], [PAGE_BYTES])
    with pytest.raises(ValueError, match="contiguous"):
        engine.register(torch.zeros(4, 4).t())
    assert engine.register(src[1:]) == src[1:].data_ptr()  # a view of a registered storage: no-op
    # A destination outside the peer's registered memory is refused by the peer, which stays healthy.
    with pytest.raises(TransferError, match="returned -1"):
        engine.write(peer.session, [base], [peer.page_addr(NUM_PAGES)], [PAGE_BYTES])
    assert _write_pages(engine, base, peer, [(1, 1)]) == PAGE_BYTES
    assert torch.equal(peer.pool(), _expected(src, [(1, 1)]))


@needs_mooncake
def test_concurrent_writes_from_threads(sender, peer):
    engine, src, base = sender
    # 8 threads x 4 batches x 2 pages: every destination page written exactly once, from a shuffled source.
    order = list(range(NUM_PAGES))
    random.Random(1).shuffle(order)
    pairs = list(zip(order, range(NUM_PAGES), strict=True))
    jobs = [pairs[i : i + 2] for i in range(0, NUM_PAGES, 2)]
    start = threading.Barrier(8)
    results: list[int | BaseException] = []

    def worker(my_jobs):
        start.wait()
        for job in my_jobs:
            try:
                results.append(_write_pages(engine, base, peer, job))
            except BaseException as exc:
                results.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[t::8],)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PIPE_WAIT_S)
    assert results == [2 * PAGE_BYTES] * len(jobs)
    assert torch.equal(peer.pool(), _expected(src, pairs))


@needs_mooncake
def test_killed_target_fails_fast_and_engine_keeps_working(sender, peer, spare):
    engine, src, base = sender
    victim = spare
    try:
        assert _write_pages(engine, base, victim, [(3, 3)]) == PAGE_BYTES
        victim.proc.kill()
        victim.proc.join()
        for _ in range(2):  # a peer we had a connection to, then the same peer again
            t0 = time.monotonic()
            with pytest.raises(TransferError, match=victim.session):
                _write_pages(engine, base, victim, [(4, 4), (5, 5)])
            assert time.monotonic() - t0 < TIMEOUT_S
        assert _write_pages(engine, base, peer, [(6, 7)]) == PAGE_BYTES
        assert torch.equal(peer.pool(), _expected(src, [(6, 7)]))
    finally:
        victim.stop()


@needs_mooncake
def test_hung_target_times_out_without_blocking_others(sender, peer, spare):
    engine, src, base = sender
    hung = spare
    try:
        assert _write_pages(engine, base, hung, [(1, 1)]) == PAGE_BYTES
        # SIGSTOP: the kernel still accepts bytes, nobody acknowledges them. Delivery is asynchronous; wait
        # until the child is really stopped, or its Mooncake threads may still answer the next write.
        os.kill(hung.proc.pid, signal.SIGSTOP)
        _, status = os.waitpid(hung.proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="timed out") as timed_out:
            _write_pages(engine, base, hung, [(2, 2)])
        elapsed = time.monotonic() - t0
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 1.5
        # The call given up on still runs inside Mooncake (it may still write): the error says so.
        still_running = timed_out.value.still_running
        assert still_running is not None and not still_running.is_set()
        # Mooncake is still running the abandoned call: the next write to that peer fails at once...
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="abandoned"):
            _write_pages(engine, base, hung, [(3, 3)])
        assert time.monotonic() - t0 < 1.0
        # ...and other peers are served as usual meanwhile.
        t0 = time.monotonic()
        assert _write_pages(engine, base, peer, [(8, 9), (9, 10)]) == 2 * PAGE_BYTES
        assert time.monotonic() - t0 < TIMEOUT_S  # not queued behind the stuck peer
        assert torch.equal(peer.pool(), _expected(src, [(8, 9), (9, 10)]))
        hung.proc.kill()  # SIGKILL also ends a stopped process; Mooncake's abandoned call then fails fast
        assert still_running.wait(PIPE_WAIT_S), "the abandoned call returns once its peer is gone"
    finally:
        hung.proc.kill()
        hung.stop()


@needs_mooncake
def test_silent_new_peer_does_not_block_other_targets(sender, peer):
    """A first write to a peer that accepts connections but never answers (a stopped process) must not
    hold Mooncake's engine-wide handshake mutex: writes to healthy peers go on."""
    engine, src, base = sender
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    connected = threading.Event()

    def accept():
        try:
            while True:
                accepted.append(server.accept()[0])
                connected.set()
        except OSError:
            pass  # server closed

    threading.Thread(target=accept, daemon=True).start()
    silent = f"127.0.0.1:{server.getsockname()[1]}"
    failure: list[BaseException] = []
    elapsed: list[float] = []

    def write_silent():
        t0 = time.monotonic()
        try:
            engine.write(silent, [base], [0x10000], [PAGE_BYTES])
        except BaseException as exc:
            failure.append(exc)
        elapsed.append(time.monotonic() - t0)

    background = threading.Thread(target=write_silent)
    try:
        background.start()
        assert connected.wait(PIPE_WAIT_S)
        t0 = time.monotonic()
        assert _write_pages(engine, base, peer, [(11, 12)]) == PAGE_BYTES
        assert time.monotonic() - t0 < TIMEOUT_S  # not queued behind the stuck peer
        background.join(PIPE_WAIT_S)
        assert len(failure) == 1 and isinstance(failure[0], TransferError)
        assert TIMEOUT_S <= elapsed[0] < TIMEOUT_S + 1.5
        assert torch.equal(peer.pool(), _expected(src, [(11, 12)]))
    finally:
        server.close()
        for conn in accepted:
            conn.close()  # the abandoned probe sees EOF and returns
        background.join(PIPE_WAIT_S)


@needs_mooncake
def test_closed_engine(sender):
    engine, src, base = sender
    other = TransferEngine(TransferConfig(timeout_s=TIMEOUT_S))  # two engines in one process: distinct ports
    assert other.session_id != engine.session_id
    dst = torch.zeros(2, PAGE_FLOATS)
    dst_base = other.register(dst)
    assert engine.write(other.session_id, [base], [dst_base + PAGE_BYTES], [PAGE_BYTES]) == PAGE_BYTES
    assert torch.equal(dst[1], src[0]) and not dst[0].any()
    other.close()
    other.close()  # idempotent
    with pytest.raises(TransferError, match="closed"):
        other.register(torch.zeros(4))
    with pytest.raises(TransferError, match="closed"):
        other.write(engine.session_id, [dst_base], [base], [4])
    t0 = time.monotonic()
    with pytest.raises(TransferError):  # its ports are closed: refused at once
        engine.write(other.session_id, [base], [dst_base], [PAGE_BYTES])
    assert time.monotonic() - t0 < TIMEOUT_S


@needs_mooncake
@pytest.mark.skipif(
    Path("/sys/class/infiniband").is_dir() and any(Path("/sys/class/infiniband").iterdir()),
    reason="this machine has RDMA devices",
)
def test_rdma_without_nics_fails_instead_of_falling_back_to_tcp():
    with pytest.raises(TransferError, match="no RDMA NIC"):
        TransferEngine(TransferConfig(protocol="rdma", device_names="mlx5_0"))
