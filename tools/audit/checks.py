"""Checks of a log: structure (rows, chain, seqs, triggers, epochs, host order: invariants 5
and 7) and the safety invariants the independent checker judges (1-4, 6, 8), on a file or on
the events a live coordinator serves."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.core import Event
from coordinator.core.invariants import InvariantChecker
from coordinator.log import StoredEvent
from coordinator.log.chain import ZERO_HASH, event_hash
from coordinator.log.sqlite import _TRIGGERS
from whimbrel.v1 import events_pb2

from .logfile import BadEvent, Unreadable, decode, malformed, open_log, stored_events

__all__ = [
    "Finding",
    "Report",
    "Unreadable",
    "open_log",
    "stored_events",
    "triggers_of",
    "verify",
    "verify_events",
]


@dataclass(frozen=True, slots=True)
class Finding:
    seq: int
    what: str


@dataclass
class Report:
    events: int
    head_seq: int
    head_hash: bytes
    findings: list[Finding]
    # Migrations not finished at the end of the log (in flight, unless the log is final).
    in_flight: list[str]

    @property
    def ok(self) -> bool:
        return not self.findings


def _normal(sql: str) -> str:
    return " ".join(sql.split())


@functools.cache
def _append_only_triggers() -> dict[str, str]:
    """The append-only triggers as the store creates them, by name: their SQL as SQLite keeps
    it (what the store runs, not a copy of it)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY)")
        conn.executescript(_TRIGGERS)
        rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        return {name: _normal(sql) for name, sql in rows}
    finally:
        conn.close()


def triggers_of(conn: sqlite3.Connection) -> dict[str, str]:
    """The log's triggers: their SQL by name."""
    rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
    return {str(name): str(sql) for name, sql in rows}


def verify(
    path: Path, expect_seq: int = 0, expect_hash: bytes = b"", *, final: bool = False
) -> Report:
    """Verify a log file; `final` says nothing may be in flight (invariants 6 and 8)."""
    conn = open_log(path)
    try:
        triggers = triggers_of(conn)
    except sqlite3.DatabaseError as err:
        raise Unreadable(f"{path}: {err}") from err
    return verify_events(stored_events(conn), triggers, expect_seq, expect_hash, final=final)


def verify_events(
    events: Iterable[StoredEvent],
    triggers: Mapping[str, str] | None,
    expect_seq: int = 0,
    expect_hash: bytes = b"",
    *,
    final: bool = False,
) -> Report:
    """Verify stored events in seq order. `triggers` (SQL by name) is None when they cannot
    be seen (a log read over gRPC)."""
    walk = _Walk(expect_seq, expect_hash, anchored=not expect_seq)
    if triggers is not None:
        walk.triggers(triggers)
    for e in events:
        walk.step(e)
    return walk.report(final=final)


@dataclass
class _Walk:
    """verify, event by event: what it carries from one to the next."""

    expect_seq: int
    expect_hash: bytes
    anchored: bool
    findings: list[Finding] = field(default_factory=list)
    count: int = 0
    prev_seq: int = 0
    prev_hash: bytes = ZERO_HASH
    chain_ok: bool = True
    # The highest epoch stored so far, and the highest a CoordinatorStarted began (at which seq).
    epoch: int = 0
    started: int = 0
    started_at: int = 0
    host_order: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Each host's newest generation that said hello.
    host_generation: dict[str, int] = field(default_factory=dict)
    checker: InvariantChecker = field(default_factory=InvariantChecker)

    def add(self, seq: int, what: str) -> None:
        self.findings.append(Finding(seq, what))

    def triggers(self, found: Mapping[str, str]) -> None:
        """The store's append-only triggers, as it creates them: a trigger of the same name on
        another table, firing at another time or not aborting does not keep events."""
        for name, sql in _append_only_triggers().items():
            if name not in found:
                self.add(0, f"append-only trigger {name} is missing")
            elif _normal(found[name]) != sql:
                shown = _normal(found[name])
                self.add(0, f"append-only trigger {name} is not the store's: {shown:.120}")

    def step(self, e: StoredEvent) -> None:
        self.count += 1
        problem = malformed(e)
        if problem:
            self._malformed(e, problem)
            return
        self._chain(e)
        self._anchor(e)
        self._epoch(e)
        self._host_order(e)
        # The chain covers the stored bytes, decodable or not: the next event follows this one.
        self.prev_seq, self.prev_hash = e.seq, e.hash
        try:
            event = decode(e)
        except BadEvent as err:
            self.add(e.seq, err.problem)
            return
        self._started(event)
        self._invariants(event)

    def report(self, *, final: bool) -> Report:
        if not self.anchored:
            self.add(self.expect_seq, "the anchored head is missing (log truncated)")
        checker = self.checker
        in_flight = sorted(set(checker.migrations) - checker.finished)
        self.findings += [
            Finding(v.seq, f"invariant {v.invariant}: {v.message}")
            for v in checker.finish(quiescent=final)
        ]
        self.findings.sort(key=lambda f: f.seq)
        return Report(self.count, self.prev_seq, self.prev_hash, self.findings, in_flight)

    def _malformed(self, e: StoredEvent, problem: str) -> None:
        seq = e.seq if type(e.seq) is int else self.prev_seq + 1
        self.add(seq, f"malformed row: {problem}")
        self._anchor(e)
        # Its hash cannot be computed: the chain cannot be followed past it.
        self.chain_ok = False
        self.prev_seq = seq

    def _chain(self, e: StoredEvent) -> None:
        if not self.chain_ok:
            return
        if e.seq != self.prev_seq + 1:
            expected = self.prev_seq + 1
            self.add(expected, f"invariant 7: seq gap: expected {expected}, found {e.seq}")
        elif e.prev_hash != self.prev_hash:
            self.add(e.seq, "invariant 7: prev_hash does not match the previous event's hash")
        elif event_hash(self.prev_hash, e) != e.hash:
            self.add(e.seq, "invariant 7: hash does not match the event's contents")
        else:
            return
        self.chain_ok = False

    def _anchor(self, e: StoredEvent) -> None:
        if e.seq == self.expect_seq:
            self.anchored = True
            if e.hash != self.expect_hash:
                self.add(e.seq, "the log does not extend the anchored head")

    def _epoch(self, e: StoredEvent) -> None:
        """Invariant 5 on the envelopes: epochs never go back, nothing is appended under an
        epoch older than the last one started, and a new epoch begins with its start (the
        store writes the new epoch and its CoordinatorStarted in one transaction)."""
        if e.epoch < self.epoch:
            self.add(e.seq, f"invariant 5: epoch went back from {self.epoch} to {e.epoch}")
        elif e.epoch < self.started:
            self.add(
                e.seq,
                f"invariant 5: appended under epoch {e.epoch} after epoch {self.started} "
                f"started at seq {self.started_at}",
            )
        elif e.epoch > self.epoch and e.type != "CoordinatorStarted":
            self.add(e.seq, f"invariant 5: epoch {e.epoch} begins with {e.type}, not its start")
        self.epoch = max(self.epoch, e.epoch)

    def _started(self, event: Event) -> None:
        p = event.payload
        if not isinstance(p, events_pb2.CoordinatorStarted):
            return
        if p.epoch != event.epoch:
            self.add(
                event.seq,
                f"invariant 5: the start of epoch {p.epoch} is stored under epoch {event.epoch}",
            )
        if p.epoch <= self.started:
            self.add(
                event.seq,
                f"invariant 5: epoch {p.epoch} started, not above epoch {self.started} "
                f"started at seq {self.started_at}",
            )
        else:
            self.started, self.started_at = p.epoch, event.seq

    def _host_order(self, e: StoredEvent) -> None:
        if not e.origin_host:
            return
        if not e.origin_seq:
            self._from_a_hello(e)
            return
        mark = (e.origin_generation, e.origin_seq)
        last = self.host_order.get(e.origin_host)
        if last is not None and mark <= last:
            self.add(
                e.seq,
                f"invariant 7: host {e.origin_host} (generation, seq) {mark} does not follow "
                f"{last}",
            )
        self.host_order[e.origin_host] = mark

    def _from_a_hello(self, e: StoredEvent) -> None:
        """The coordinator writes what a hello says (the host's HostConnected, then a snapshot
        of each of its QEMUs) under the hello's generation and no seq; nothing else of a host's
        comes unnumbered, nor from a generation older than the newest that said hello."""
        host, generation = e.origin_host, e.origin_generation
        if e.type not in ("HostConnected", "VmObserved"):
            self.add(e.seq, f"invariant 7: host {host}'s {e.type} carries no seq")
            return
        newest = self.host_generation.get(host, 0)
        if generation < newest:
            self.add(e.seq, f"invariant 7: host {host}'s {e.type} of generation {generation} "
                            f"after generation {newest} said hello")  # fmt: skip
        self.host_generation[host] = max(newest, generation)

    def _invariants(self, event: Event) -> None:
        try:
            self.checker.feed(event)
        # The checker judges what a coordinator writes; what else a forged log holds is a
        # finding at its seq, and the checks go on with the next event.
        except Exception as err:
            self.add(event.seq, f"{event.type} cannot be checked: {err}")
