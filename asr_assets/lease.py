"""One writer per output: a lease per (shard, asset), kept in the output store itself.

Two runs of one shard at once (the arrival sensor's run during a backfill, two CLI runs, two machines) would share part
names and rewrite each other's manifests and dead-letter tables. So every step takes the lease of its (shard, asset)
before it writes, and keeps it alive with a heartbeat; a second writer fails fast with a message naming the holder, or
waits for it (``ASR_LEASE_WAIT_S``). The lease lives in the output store, so it works alike on a local folder, a file
system shared by several machines, and OSS.

A lease is a folder of generations, ``leases/{shard}/{asset}/{generation:012d}.json``; the highest is the current one.
A taker that finds it released, expired (no heartbeat for ``ttl_s``) or held by a process of this machine that is gone
creates the next generation with ``put_if_absent``: of two racing takers exactly one succeeds. The holder rewrites its
own generation every ``ttl_s / 3``; when it sees a higher generation (it was stalled past its ttl and another run took
over), or cannot renew for most of the ttl, ``check`` raises LeaseLost and the step stops before its next write.

Expiry compares the holder's heartbeat time with the taker's clock: machines sharing an output root need clocks that
agree to well within the ttl (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from resources.storage import ObjectInfo, ObjectStore, host_id, pid_alive

log = logging.getLogger(__name__)

TTL_ENV, WAIT_ENV, INDEX_WAIT_ENV = "ASR_LEASE_TTL_S", "ASR_LEASE_WAIT_S", "ASR_INDEX_LEASE_WAIT_S"
DEFAULT_TTL_S = 300.0
# Steps fail fast by default: a second run of a shard is a mistake to report, not a queue.
DEFAULT_WAIT_S = 0.0
# Sensor and schedule ticks index outside any step: they wait this long for a shard's media_index step to finish.
DEFAULT_INDEX_WAIT_S = 60.0
POLL_S = 1.0
# A holder stops writing once its last renewal is this old (in ttls): a taker, whose clock may run a little ahead,
# considers it expired only at 1.0.
RENEW_LIMIT = 0.8


def _clock() -> float:
    """Seconds on a clock that keeps counting while the machine is suspended (CLOCK_BOOTTIME): after a VM or laptop
    resumes, a holder must see that its heartbeat is as old as the takers see it, not the monotonic clock's pause."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class LeaseHeld(Exception):
    """Another live writer holds the lease (after waiting, if waiting was configured)."""


class LeaseLost(Exception):
    """This process no longer holds its lease: another writer took over or it could not renew in time."""


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: must not be negative")
    return value


def ttl_s() -> float:
    """How long a lease lives without a heartbeat (``ASR_LEASE_TTL_S``, default 300)."""
    return max(_seconds(TTL_ENV, DEFAULT_TTL_S), 1.0)


def wait_s() -> float:
    """How long a step waits for a held lease before failing (``ASR_LEASE_WAIT_S``, default 0: fail fast)."""
    return _seconds(WAIT_ENV, DEFAULT_WAIT_S)


def index_wait_s() -> float:
    """How long indexing outside a step (sensor, schedule) waits for a shard's lease (``ASR_INDEX_LEASE_WAIT_S``)."""
    return _seconds(INDEX_WAIT_ENV, DEFAULT_INDEX_WAIT_S)


# This machine and pid namespace: a pid means the same process only within one (a container reusing another's host
# name has its own pid namespace, and a reboot a new boot id).
_NODE = host_id(digest_size=8)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Holder:
    """One generation's record: who took the lease, when, and whether it still lives."""

    run_id: str
    host: str
    node: str
    pid: int
    token: str  # tells this taker's record from any other's
    since: str
    heartbeat_at: str
    ttl_s: float
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        fields = json.loads(data)
        return cls(**{name: fields[name] for name in cls.__dataclass_fields__ if name in fields})

    def silent_s(self, now: datetime) -> float:
        """Seconds since its last heartbeat."""
        return (now - datetime.fromisoformat(self.heartbeat_at)).total_seconds()

    def free(self, now: datetime) -> bool:
        """Whether another writer may take over: released, expired, or its process on this machine is gone (or is this
        process, and no thread of it holds this record: an earlier release of it failed)."""
        if self.released or self.silent_s(now) > self.ttl_s:
            return True
        if self.node != _NODE:
            return False
        if self.pid == os.getpid():
            with _registry:
                ours = _claiming | {held._record.token for held in _held.values() if held._record is not None}
            return self.token not in ours
        return not pid_alive(self.pid)

    def describe(self, now: datetime) -> str:
        run = f"run {self.run_id}" if self.run_id else "a sensor or schedule tick (no run)"
        return (
            f"{run} on host {self.host} (pid {self.pid}), holding it since {self.since}, last heartbeat "
            f"{self.silent_s(now):.0f} s ago"
        )


class Lease:
    """The lease of one (shard, asset) in one output store, as held by this process. Take it with ``hold``."""

    def __init__(self, store: ObjectStore, shard: str, asset: str, run_id: str, ttl: float) -> None:
        self.store, self.shard, self.asset, self.run_id, self.ttl_s = store, shard, asset, run_id, ttl
        self.folder = f"leases/{shard}/{asset}/"
        self.generation = 0
        self._record: Holder | None = None
        self._lost: str | None = None
        self._renewed = 0.0  # monotonic time of the last heartbeat written
        self._next_renewal = 0.0
        self._depth = 0

    def key(self, generation: int) -> str:
        return f"{self.folder}{generation:012d}.json"

    def check(self) -> None:
        """Raises LeaseLost when this process may no longer write the lease's output (call it before each write)."""
        if self._lost is None and _clock() - self._renewed > RENEW_LIMIT * self.ttl_s:
            self._lost = (
                f"its heartbeat could not be renewed for {_clock() - self._renewed:.0f} s "
                f"(ttl {self.ttl_s:g} s), so another run may have taken over"
            )
        if self._lost is not None:
            raise LeaseLost(
                f"{self.asset} on {self.shard}: this step lost its lease ({self._lost}); it stopped before writing "
                f"more. Re-run the partition once no other run works on it ({self.store.uri_of(self.folder[:-1])})"
            )

    # ------------------------------------------------------------------------------------------------ storage

    def _generations(self) -> list[int]:
        found = []
        for info in self.store.list(self.folder):
            name = info.key[len(self.folder) :]
            if name.endswith(".json") and name[:-5].isdigit():
                found.append(int(name[:-5]))
        return sorted(found)

    def _current(self) -> tuple[int, Holder | None]:
        """The highest generation and its record (0 and None for a lease never taken)."""
        while True:
            generations = self._generations()
            if not generations:
                return 0, None
            key = self.key(generations[-1])
            try:
                return generations[-1], Holder.from_bytes(self.store.read_bytes(key))
            except FileNotFoundError:
                continue  # pruned between the listing and the read: list again
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(
                    f"lease record {self.store.uri_of(key)} is unreadable ({exc}); delete it once no run writes "
                    f"{self.asset} on {self.shard}"
                ) from None

    def _new_record(self) -> Holder:
        now = _now().isoformat()
        return Holder(
            run_id=self.run_id,
            host=socket.gethostname(),
            node=_NODE,
            pid=os.getpid(),
            token=secrets.token_hex(8),
            since=now,
            heartbeat_at=now,
            ttl_s=self.ttl_s,
        )

    def _prune(self) -> None:
        """Deletes generations older than the one before the highest (their holders are long gone)."""
        generations = self._generations()
        for generation in generations[:-2]:
            self.store.delete(self.key(generation))

    # ---------------------------------------------------------------------------------------------- life cycle

    def _acquire(self, wait: float) -> None:
        deadline = _clock() + wait
        while True:
            top, holder = self._current()
            if holder is None or holder.free(_now()):
                record = self._new_record()
                self._renewed = _clock()
                # Claimed before it exists: another thread of this process that reads it before ``take`` has
                # registered it must see a live holder, not a record of this process nobody holds.
                with _registry:
                    _claiming.add(record.token)
                try:
                    won = self.store.put_if_absent(self.key(top + 1), record.to_bytes())
                except BaseException:
                    with _registry:
                        _claiming.discard(record.token)
                    raise
                if not won:
                    with _registry:
                        _claiming.discard(record.token)
                if won:
                    self.generation, self._record = top + 1, record
                    self._next_renewal = self._renewed + self.ttl_s / 3
                    if holder is not None and not holder.released:
                        who = holder.describe(_now())
                        log.warning("%s on %s: took over the lease of %s", self.asset, self.shard, who)
                    self._prune()
                    return
                continue  # another taker created this generation first: look at it
            remaining = deadline - _clock()
            if remaining <= 0:
                raise LeaseHeld(self._held_message(holder, wait))
            time.sleep(min(POLL_S, remaining))

    def _held_message(self, holder: Holder, wait: float) -> str:
        waited = f"after waiting {wait:g} s" if wait else "and this run does not wait"
        return (
            f"{self.asset} on {self.shard} is being written by another writer: {holder.describe(_now())} "
            f"(lease {self.store.uri_of(self.folder[:-1])}). Only one writer per shard and asset at a time, "
            f"{waited}: nothing was written. To wait for it instead, set {WAIT_ENV} to a number of seconds; a lease "
            f"whose holder died expires {holder.ttl_s:g} s after its last heartbeat ({TTL_ENV}), or at once when its "
            "process on this machine is gone."
        )

    def _renew(self) -> None:
        """One heartbeat: rewrites this holder's record, unless a higher generation shows another writer took over."""
        assert self._record is not None
        started = _clock()
        if started - self._renewed > RENEW_LIMIT * self.ttl_s:
            # Paused past the point where a taker may think it expired (a suspended VM, a stalled store): renewing now
            # could race a takeover, so the lease is given up; check() stops the step's next write.
            self._lost = f"its last heartbeat is {started - self._renewed:.0f} s old (past {RENEW_LIMIT:g} x the ttl)"
            log.error("%s on %s: lease lost: %s", self.asset, self.shard, self._lost)
            return
        top, holder = self._current()
        if top != self.generation:
            who = holder.describe(_now()) if holder is not None else "nobody (its record was removed)"
            self._lost = f"it expired and was taken over by {who}"
            log.error("%s on %s: lease lost: %s", self.asset, self.shard, self._lost)
            return
        record = replace(self._record, heartbeat_at=_now().isoformat())
        self.store.put_bytes(self.key(self.generation), record.to_bytes())
        self._record, self._renewed = record, started
        self._next_renewal = started + self.ttl_s / 3

    def _let_go(self) -> None:
        """Marks the record released (if this process still holds it), so the next writer need not wait for expiry."""
        if self._lost is not None or self._record is None:
            return
        try:
            if self._generations()[-1:] == [self.generation]:
                released = replace(self._record, heartbeat_at=_now().isoformat(), released=True)
                self.store.put_bytes(self.key(self.generation), released.to_bytes())
            self._prune()
        except Exception as exc:  # never hide the step's own outcome; the lease expires after its ttl anyway
            what = "%s on %s: could not release the lease (%s); it expires in %g s"
            log.warning(what, self.asset, self.shard, exc, self.ttl_s)

    def release(self) -> None:
        """Gives the lease up (a re-entered lease only when its outermost holder does)."""
        with _registry:
            self._depth -= 1
            if self._depth > 0:
                return
            _held.pop(self._key, None)
        _keeper.remove(self)
        self._let_go()


class _Keeper:
    """One heartbeat thread per process for every lease it holds (a sensor tick may hold hundreds of shards)."""

    def __init__(self) -> None:
        self._leases: set[Lease] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases.add(lease)
            if self._thread is None or not self._thread.is_alive():  # none yet, or this is a forked child
                self._thread = threading.Thread(target=self._run, name="asr-lease-heartbeat", daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a lease added from here on sets it again and ends the wait below
            with self._lock:
                leases = list(self._leases)
            now = _clock()
            for lease in leases:
                if lease._lost is None and now >= lease._next_renewal:
                    try:
                        lease._renew()
                    except Exception as exc:  # a storage hiccup: try again soon; check() fails the step if it lasts
                        lease._next_renewal = _clock() + min(lease.ttl_s / 10, 10.0)
                        log.warning("%s on %s: lease heartbeat failed: %s", lease.asset, lease.shard, exc)
            with self._lock:
                due = [lease._next_renewal for lease in self._leases if lease._lost is None]
            self._wake.wait(max(0.05, min(due) - _clock()) if due else None)


_keeper = _Keeper()
_registry = threading.Lock()
_held: dict[tuple[str, str, str, int], Lease] = {}
_claiming: set[str] = set()  # tokens of records being created by a thread of this process, not yet in _held
_taking: dict[tuple[str, str, str, int], threading.Lock] = {}


def _registry_key(store: ObjectStore, shard: str, asset: str) -> tuple[str, str, str, int]:
    # Per thread: Dagster evaluates sensor and schedule ticks on a thread pool, so two indexers in one process (an
    # arrivals tick and a rescan) are two writers and must not share a lease; a step re-enters on its own thread.
    return store.root_uri, shard, asset, threading.get_ident()


def take(store: ObjectStore, shard: str, asset: str, run_id: str = "", wait: float | None = None) -> Lease:
    """Takes the lease of (shard, asset) in ``store``, waiting up to ``wait`` seconds (default ``ASR_LEASE_WAIT_S``)
    for a live holder to finish. Re-entrant within a thread: taking a lease this thread holds returns it (code that
    takes the lease called inside a step that holds it must not wait for itself); another thread of the same process
    is another writer and waits like any other.

    Raises:
        LeaseHeld: another live writer still holds it; the message names the holder and how to wait.
        LeaseLost: this process holds it but lost it.
    """
    key = _registry_key(store, shard, asset)
    with _registry:
        gate = _taking.setdefault(key, threading.Lock())
    with gate:  # two threads of one process taking the same lease: the second finds the first's
        with _registry:
            lease = _held.get(key)
            if lease is not None:
                lease.check()
                lease._depth += 1
                return lease
        lease = Lease(store, shard, asset, run_id, ttl_s())
        lease._acquire(wait_s() if wait is None else wait)
        with _registry:
            lease._depth, lease._key = 1, key
            _held[key] = lease
            _claiming.discard(lease._record.token)
        _keeper.add(lease)
        return lease


@contextlib.contextmanager
def hold(store: ObjectStore, shard: str, asset: str, run_id: str = "", wait: float | None = None) -> Iterator[Lease]:
    """``take`` for the length of a block, released when it ends (however it ends)."""
    lease = take(store, shard, asset, run_id, wait)
    try:
        yield lease
    finally:
        lease.release()


class GuardedStore(ObjectStore):
    """An output store whose every write first runs ``check`` (a lease's): a step that lost its lease stops before it
    writes. Reads pass straight through; pickled (to a worker process) it becomes the plain store."""

    def __init__(self, inner: ObjectStore, check: Callable[[], None]) -> None:
        self._inner, self._check = inner, check

    @property
    def root_uri(self) -> str:
        return self._inner.root_uri

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        return self._inner.list(prefix, start_after)

    def exists(self, key: str) -> bool:
        return self._inner.exists(key)

    def read_bytes(self, key: str) -> bytes:
        return self._inner.read_bytes(key)

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._inner.read_range(key, start, end)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._check()
        self._inner.put_bytes(key, data)

    def put_file(self, key: str, src: Path) -> None:
        self._check()
        self._inner.put_file(key, src)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._check()
        return self._inner.put_if_absent(key, data)

    def delete(self, key: str) -> None:
        self._check()
        self._inner.delete(key)

    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        return self._inner.local_path(key, max_bytes, version)

    def scratch_dir(self) -> Path:
        return self._inner.scratch_dir()

    def sweep_stale_temp(self, folder: str) -> int:
        return self._inner.sweep_stale_temp(folder)

    def sweep_stale_scratch(self) -> int:
        return self._inner.sweep_stale_scratch()

    def discard_scratch(self) -> None:
        self._inner.discard_scratch()

    def uri_of(self, key: str) -> str:
        return self._inner.uri_of(key)

    def unsafe_keys(self, keys):
        return self._inner.unsafe_keys(keys)

    def __getattr__(self, name: str):
        # What only one kind of store has (LocalStore.root): looked up only when normal lookup fails.
        if name in ("_inner", "_check"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __reduce_ex__(self, protocol):
        return self._inner.__reduce_ex__(protocol)
