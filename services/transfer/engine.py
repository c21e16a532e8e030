"""Mooncake TransferEngine wrapper: memory registration and batched one-sided writes between pods.

A decode pod registers its KV pool and GDN state pool once at start and publishes ``session_id`` plus the
base addresses; a prefill pod writes pages and state slots straight into that memory with ``write``.
Peers find each other with Mooncake's P2P handshake (no etcd / metadata server).

What Mooncake (mooncake-transfer-engine[-non-cuda] 0.3.13.post1) does, as observed on TCP loopback; the
design below follows from it:

- Transport choice: ``initialize(..., protocol, ...)`` does not pick the transport. Mooncake discovers
  the local topology and installs RDMA when it finds at least one RDMA NIC (filtered by device names),
  TCP otherwise; ``MC_FORCE_TCP`` forces TCP. An unknown protocol, "rdma" without any NIC, or a
  misspelled NIC name all return 0 and quietly run over TCP. So "tcp" sets ``MC_FORCE_TCP`` while the
  engine initializes (per Mooncake's source; not tried on a machine with a NIC), and "rdma" first checks
  that Mooncake sees NICs, failing loudly otherwise.
- Ports: with P2PHANDSHAKE the engine binds a free RPC (handshake) port, picked at random in
  [MC_MIN_RPC_PORT, MC_MAX_RPC_PORT] = 15000-17000 by default, and the TCP transport a second free port;
  any port in the hostname is ignored (unless MC_LEGACY_RPC_PORT_BINDING is set). ``get_rpc_port()``
  gives the one peers need, so the session id is ``hostname:rpc_port``. Several engines on one machine,
  even in one process, get distinct ports.
- Registration: plain (pageable) CPU memory from torch registers fine over TCP, at any address and length
  (no alignment needed); RDMA pins it. Mooncake refuses a zero-length region (-1) and any region
  overlapping one already registered (-7), so registering one storage twice fails: we remember what is
  registered and make that a no-op. TCP does not check that a *source* lies in registered memory (RDMA
  does, through the lkey), so ``write`` checks it here, to catch on CPU what would fail in production.
  The receiving side does check *destinations*: a write outside the peer's registered buffers is refused
  ("WRITE rejected by server") and returns -1, with no damage.
- Dead peer: a write to a killed process (connection refused or reset) returns -1 within milliseconds,
  whether the peer was known before or never contacted, and whether it died before or during a transfer.
  The engine keeps working for other peers.
- Hung peer (process stopped, or alive but not reading): ``batch_transfer_sync_write`` blocks until its
  own deadline, ``MC_TRANSFER_TIMEOUT`` seconds (read when the engine object is created; default 30,
  floor 5) plus 1 ns per byte, or until the TCP transport notices no progress for
  ``MC_TCP_PROGRESS_TIMEOUT_SEC`` (default 30). Meanwhile it busy-polls: one full CPU core per waiting
  call. It releases the GIL. So ``write`` runs the call on a worker thread and gives up on it at
  ``timeout_s``; the abandoned call runs on until Mooncake's own deadline, which we set to
  max(5, timeout_s) so it does not spin long.
- A failed or abandoned write is not a write that did nothing: bytes already in the peer's socket buffer
  are applied when the peer resumes, even after Mooncake reported -1 and dropped the connection. After a
  TransferError the destination pages hold unknown content, possibly still changing for a little while.
- First contact: the first write to a peer opens its "segment" (a metadata handshake) while holding a
  mutex of the whole engine. A peer that accepts the connection but never answers (a stopped process)
  keeps it for ~60 s, and every other write of this process, to healthy peers too, waits behind it.
  ``send_probe`` talks to the same handshake port without taking that mutex (a healthy peer answers in
  ~1 ms), so we probe a peer, bounded by ``timeout_s``, before the first write to it and after any failure.
- Threads: writes from several threads into one engine are correct (checked with 32 threads), but since
  each waiting call busy-polls, many concurrent calls starve Mooncake's own worker threads: on 2 cores,
  32 threads x 50 batches took 53 s concurrently and 5 s serialized. Writes to one target are therefore
  serialized here (one lock per target); writes to different targets run in parallel, so a hung target
  does not hold up the others.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .descriptors import coalesce

__all__ = ["TransferConfig", "TransferEngine", "TransferError", "coalesce"]

log = logging.getLogger(__name__)

_PROTOCOLS = ("tcp", "rdma")
_MOONCAKE_TIMEOUT_FLOOR_S = 5  # Mooncake clamps MC_TRANSFER_TIMEOUT to at least 5 s
# Mooncake's TCP transport queues each descriptor on a bounded per-connection lane; a batch with more
# descriptors than the lanes hold fails as a whole ("TCP lane queue-full rejection", -1), seen here from
# about 2,000 descriptors on (2,562 failed, 2,048 sometimes). A hand-over of scattered pages easily has
# tens of thousands (pages x attention layers), so batches are cut to this many, sent one after another.
MAX_DESCRIPTORS_PER_BATCH = 1024


@dataclass(frozen=True)
class TransferConfig:
    protocol: str = field(default="tcp", metadata={"help": "tcp or rdma"})
    device_names: str = field(
        default="", metadata={"help": "RDMA NICs, comma-separated (mlx5_0,mlx5_1); empty: all (rdma only)"}
    )
    hostname: str = field(default="127.0.0.1", metadata={"help": "the address peers use to reach this process"})
    metadata_server: str = field(
        default="P2PHANDSHAKE", metadata={"help": "Mooncake metadata: P2PHANDSHAKE (no server) or a server URL"}
    )
    timeout_s: float = field(default=30.0, metadata={"help": "a batch write taking longer fails"})

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol must be one of {_PROTOCOLS}, got {self.protocol!r}")
        if not self.hostname:
            raise ValueError("hostname must not be empty")
        if self.hostname.count(":") == 1:
            raise ValueError(f"hostname takes no port (Mooncake picks a free one), got {self.hostname!r}")
        if not self.metadata_server:
            raise ValueError("metadata_server must not be empty (P2PHANDSHAKE needs no server)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


class TransferError(RuntimeError):
    """A Mooncake operation failed or timed out. After a failed write the destination holds unknown bytes.

    ``still_running``: for a write given up on at its timeout, set once Mooncake returns from it; until
    then the call may still write into the peer's memory."""

    def __init__(self, message: str, still_running: threading.Event | None = None) -> None:
        super().__init__(message)
        self.still_running = still_running


@dataclass
class _Target:
    """Per-peer state. ``lock`` serializes writes to the peer; the worker thread running a write holds it
    until Mooncake returns, even after the caller gave up, so calls never pile up on a hung peer."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    probed: bool = False  # answered a handshake probe, and no write to it failed since
    abandoned_at: float | None = None  # monotonic time a caller gave up on a call still inside Mooncake


_env_lock = threading.Lock()


@contextlib.contextmanager
def _scoped_env(overrides: dict[str, str]) -> Iterator[None]:
    """Set Mooncake's environment knobs while an engine is created; a value the operator set wins."""
    with _env_lock:
        added = [k for k in overrides if k not in os.environ]
        for k in added:
            os.environ[k] = overrides[k]
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)


def _import_mooncake():
    try:
        import mooncake.engine
    except ImportError as exc:
        raise ImportError(
            "Mooncake is not usable: pip install mooncake-transfer-engine (GPU) or "
            "mooncake-transfer-engine-non-cuda (CPU), and apt-get install libibverbs1 librdmacm1 libnuma1; "
            f"import said: {exc}"
        ) from exc
    return mooncake.engine


def _check_rdma_nics(engine, device_names: str) -> None:
    """Fail unless Mooncake's topology discovery sees the RDMA NICs (else it would silently use TCP)."""
    try:
        # {"cpu:0": [[preferred NICs], [other NICs]], "cuda:0": ...}; discovery runs in a throwaway engine.
        topology = json.loads(engine.get_local_topology(device_names))
        found = {nic for lists in topology.values() for nic_list in lists for nic in nic_list}
    except (ValueError, TypeError, AttributeError) as exc:  # an unexpected format: say so, don't guess
        log.warning("could not read Mooncake's topology to check the RDMA NICs: %s", exc)
        return
    if not found:
        raise TransferError(
            f"protocol rdma: Mooncake finds no RDMA NIC (device_names={device_names!r}); it would fall back to TCP"
        )
    missing = sorted({n.strip() for n in device_names.split(",") if n.strip()} - found)
    if missing:
        log.warning("RDMA NICs %s not found by Mooncake; using %s", missing, sorted(found))


class TransferEngine:
    """One Mooncake TransferEngine per process; memory regions are registered once at start."""

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        mc = _import_mooncake()
        self._supports_cuda = bool(getattr(mc, "SUPPORT_CUDA", False))
        env = {"MC_TRANSFER_TIMEOUT": str(max(_MOONCAKE_TIMEOUT_FLOOR_S, math.ceil(config.timeout_s)))}
        if config.protocol == "tcp":
            env["MC_FORCE_TCP"] = "1"  # else Mooncake would pick RDMA on a machine that has a NIC
        with _scoped_env(env):
            engine = mc.TransferEngine()  # reads MC_TRANSFER_TIMEOUT
            if config.protocol == "rdma":
                _check_rdma_nics(engine, config.device_names)
            device_names = config.device_names if config.protocol == "rdma" else ""
            rc = engine.initialize(config.hostname, config.metadata_server, config.protocol, device_names)
        if rc != 0:
            raise TransferError(f"Mooncake initialize({config.hostname}, {config.metadata_server}) returned {rc}")
        self._engine = engine
        self._session_id = f"{config.hostname}:{engine.get_rpc_port()}"
        self._lock = threading.Lock()  # guards the fields below
        self._closed = False
        # Registered storages by base address, with the storage itself so the memory outlives any write
        # that Mooncake may still be running (peers write into it; abandoned calls read from it).
        self._regions: dict[int, tuple[int, torch.UntypedStorage]] = {}
        self._bases: list[int] = []  # sorted keys of _regions, for bisect
        self._targets: dict[str, _Target] = {}
        log.info("Mooncake %s transfer engine at %s", config.protocol, self._session_id)

    @property
    def session_id(self) -> str:
        """``host:port`` that peers pass as the target of a write."""
        return self._session_id

    def register(self, tensor: torch.Tensor) -> int:
        """Register the whole storage under ``tensor`` and return the address of its first element.

        Registering another view of an already registered storage is a no-op. The engine keeps the storage
        alive until it is garbage-collected, since peers may write into it at any time.
        """
        if not tensor.is_contiguous():
            raise ValueError("register needs a contiguous tensor")
        if tensor.device.type == "cuda" and not self._supports_cuda:
            raise ValueError("this Mooncake build has no CUDA support (the -non-cuda package?); register CPU memory")
        if tensor.device.type not in ("cpu", "cuda"):
            raise ValueError(f"cannot register {tensor.device.type} memory")
        storage = tensor.untyped_storage()
        base, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            raise ValueError("cannot register an empty tensor")
        with self._lock:
            self._check_open()
            if base in self._regions and self._regions[base][0] == nbytes:
                return tensor.data_ptr()
            for other, (other_bytes, _) in self._regions.items():
                if base < other + other_bytes and other < base + nbytes:
                    raise ValueError(
                        f"[{base:#x}, +{nbytes}) overlaps the registered region [{other:#x}, +{other_bytes})"
                    )
            # Location "*": Mooncake finds out itself whether the memory is host or device, and its NUMA node.
            rc = self._engine.register_memory(base, nbytes)
            if rc != 0:
                raise TransferError(f"Mooncake register_memory({base:#x}, {nbytes}) returned {rc}")
            self._regions[base] = (nbytes, storage)
            bisect.insort(self._bases, base)
        return tensor.data_ptr()

    def write(self, target_session: str, src_addrs: Sequence[int], dst_addrs: Sequence[int],
              lengths: Sequence[int]) -> int:
        """Copy local registered ranges into ``target_session``'s registered memory in one batch; return bytes.

        Descriptors are coalesced first. Blocks until every byte is acknowledged by the peer or
        ``timeout_s`` passes. Raises ValueError for malformed descriptors or a source outside registered
        memory, and TransferError (target, descriptor count, Mooncake's code) on failure or timeout; the
        destination then holds unknown bytes.
        """
        if ":" not in target_session:
            raise ValueError(f"target_session must be a peer's host:port session id, got {target_session!r}")
        src, dst, lens = coalesce(src_addrs, dst_addrs, lengths)
        if not src:
            return 0
        total = sum(lens)
        what = f"write of {len(src)} descriptors ({total} bytes) to {target_session}"
        deadline = time.monotonic() + self.config.timeout_s
        with self._lock:
            self._check_open()
            self._check_sources(src, lens)
            target = self._targets.setdefault(target_session, _Target())
            engine = self._engine
            if target.abandoned_at is not None:
                # A hung peer: fail now instead of queuing another call behind the one Mooncake still runs.
                raise TransferError(
                    f"{what}: an earlier write was abandoned {time.monotonic() - target.abandoned_at:.1f} s ago "
                    "and Mooncake is still running it (it gives up after MC_TRANSFER_TIMEOUT)"
                )
        if not target.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferError(f"{what}: timed out after {self.config.timeout_s} s waiting for earlier writes")

        # The worker owns target.lock from here on and releases it when Mooncake returns.
        done = threading.Event()
        outcome: list[BaseException | None] = [None]

        def run(engine) -> None:
            try:
                self._write_locked(engine, target, target_session, src, dst, lens, what)
            except TransferError as exc:
                # Handed to the caller without the worker's frames: they reference the Mooncake engine and
                # would keep it (its ports, its registrations) alive after close() for as long as the error lives.
                outcome[0] = exc.with_traceback(None)
            except BaseException as exc:  # a bug: keep the traceback
                outcome[0] = exc
            finally:
                with self._lock:
                    if target.abandoned_at is not None:
                        log.info("%s: the abandoned call returned after %.1f s (%s)", what,
                                 time.monotonic() - target.abandoned_at, outcome[0] or "ok")
                    target.abandoned_at = None
                    done.set()
                target.lock.release()

        try:
            threading.Thread(target=run, args=(engine,), name="baton-transfer", daemon=True).start()
        except BaseException:
            target.lock.release()
            raise
        del engine  # only the worker holds it now (see run)
        finished = done.wait(timeout=max(0.0, deadline - time.monotonic()))
        if not finished:
            with self._lock:
                finished = done.is_set()  # it may have finished between the wait and the lock
                if not finished:
                    target.abandoned_at = time.monotonic()
            if not finished:
                log.warning("%s: no answer within %s s, abandoning the call", what, self.config.timeout_s)
                raise TransferError(f"{what}: timed out after {self.config.timeout_s} s", still_running=done)
        if outcome[0] is not None:
            raise outcome[0]
        return total

    def _write_locked(self, engine, target: _Target, session: str, src: list[int], dst: list[int],
                      lens: list[int], what: str) -> None:
        """Runs on the worker thread holding ``target.lock``."""
        if not target.probed:
            # The handshake of a first write holds an engine-wide Mooncake mutex; the probe does not (see
            # the module docstring). A peer that answers the probe answers the handshake just after.
            rc = engine.send_probe(session)
            if rc != 0:
                raise TransferError(f"{what}: the peer did not answer Mooncake's probe (code {rc})")
            target.probed = True
        for start in range(0, len(src), MAX_DESCRIPTORS_PER_BATCH):
            stop = start + MAX_DESCRIPTORS_PER_BATCH
            rc = engine.batch_transfer_sync_write(session, src[start:stop], dst[start:stop], lens[start:stop])
            if rc != 0:
                target.probed = False  # Mooncake may have dropped the segment; probe before the next attempt
                raise TransferError(
                    f"{what}: Mooncake batch_transfer_sync_write returned {rc} (descriptors {start}-{stop - 1})"
                )

    def close(self) -> None:
        """Stop serving and writing. Mooncake has no explicit shutdown: dropping the last reference runs its
        destructor, which closes the listening ports and drops the registrations. A call abandoned after a
        timeout keeps its own reference, so the engine is destroyed only when that call returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._engine = None
            self._targets.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("the transfer engine is closed")

    def _check_sources(self, src: list[int], lens: list[int]) -> None:
        """Every source range must lie inside one registered region (RDMA needs it; TCP would not check)."""
        for s, n in zip(src, lens, strict=True):
            i = bisect.bisect_right(self._bases, s) - 1
            if i < 0 or s + n > self._bases[i] + self._regions[self._bases[i]][0]:
                raise ValueError(f"source range [{s:#x}, +{n}) is not inside memory registered with this engine")
