"""Checks of a log: structure (chain, seqs, triggers, epochs, host order: invariants 5 and 7)
and the safety invariants the independent checker judges (1-4, 6, 8), on a file or on the
events a live coordinator serves."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator import codec
from coordinator.core.invariants import InvariantChecker
from coordinator.log import StoredEvent
from coordinator.log.chain import ZERO_HASH, event_hash

READ = (
    "SELECT seq, stream, type, epoch, time_us, payload, origin_host, origin_generation, "
    "origin_seq, prev_hash, hash FROM events ORDER BY seq"
)


class Unreadable(Exception):
    """The file is not a readable Whimbrel log."""


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


def open_log(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise Unreadable(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise Unreadable(f"{path}: {err}") from err
    if "events" not in tables:
        raise Unreadable(f"{path}: not a Whimbrel log (no events table)")
    return conn


def stored_events(conn: sqlite3.Connection) -> Iterator[StoredEvent]:
    try:
        for row in conn.execute(READ):
            yield StoredEvent(*row)
    except sqlite3.DatabaseError as err:
        raise Unreadable(str(err)) from err


def _hash(prev_hash: bytes, e: StoredEvent) -> bytes | None:
    """The event's chain hash, or None when the row is malformed (a column of the wrong type,
    as an edit through plain SQL easily leaves it): such a row cannot match its hash."""
    try:
        return event_hash(prev_hash, e)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def verify(
    path: Path, expect_seq: int = 0, expect_hash: bytes = b"", *, final: bool = False
) -> Report:
    """Verify a log file; `final` says nothing may be in flight (invariants 6 and 8)."""
    conn = open_log(path)
    triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    return verify_events(stored_events(conn), triggers, expect_seq, expect_hash, final=final)


def verify_events(
    events: Iterable[StoredEvent],
    triggers: set[str] | None,
    expect_seq: int = 0,
    expect_hash: bytes = b"",
    *,
    final: bool = False,
) -> Report:
    """Verify stored events in seq order. `triggers` is None when they cannot be seen (a log
    read over gRPC)."""
    findings: list[Finding] = []
    for needed in ("events_append_only_update", "events_append_only_delete"):
        if triggers is not None and needed not in triggers:
            findings.append(Finding(0, f"append-only trigger {needed} is missing"))
    prev_seq, prev_hash, epoch, count = 0, ZERO_HASH, 0, 0
    host_order: dict[str, tuple[int, int]] = {}
    checker = InvariantChecker()
    anchored = not expect_seq
    chain_ok = True
    for e in events:
        count += 1
        if chain_ok:
            problem = ""
            if e.seq != prev_seq + 1:
                problem = f"invariant 7: seq gap: expected {prev_seq + 1}, found {e.seq}"
            elif e.prev_hash != prev_hash:
                problem = "invariant 7: prev_hash does not match the previous event's hash"
            elif _hash(prev_hash, e) != e.hash:
                problem = "invariant 7: hash does not match the event's contents"
            if problem:
                findings.append(Finding(e.seq if "gap" not in problem else prev_seq + 1, problem))
                chain_ok = False
        if e.seq == expect_seq:
            anchored = True
            if e.hash != expect_hash:
                findings.append(Finding(e.seq, "the log does not extend the anchored head"))
        if e.epoch < epoch:
            findings.append(
                Finding(e.seq, f"invariant 5: epoch went back from {epoch} to {e.epoch}")
            )
        epoch = max(epoch, e.epoch)
        if e.origin_host and e.origin_seq:
            mark = (e.origin_generation, e.origin_seq)
            last = host_order.get(e.origin_host)
            if last is not None and mark <= last:
                findings.append(
                    Finding(
                        e.seq,
                        f"invariant 7: host {e.origin_host} (generation, seq) {mark} does not "
                        f"follow {last}",
                    )
                )
            host_order[e.origin_host] = mark
        # The chain covers the stored bytes, decodable or not: the next event follows this one.
        prev_seq, prev_hash = e.seq, e.hash
        try:
            event = codec.from_stored(e)
        except Exception as err:
            findings.append(Finding(e.seq, f"payload of type {e.type!r} does not decode: {err}"))
            continue
        checker.feed(event)
    if not anchored:
        findings.append(Finding(expect_seq, "the anchored head is missing (log truncated)"))
    in_flight = sorted(set(checker.migrations) - checker.finished)
    findings += [
        Finding(v.seq, f"invariant {v.invariant}: {v.message}")
        for v in checker.finish(quiescent=final)
    ]
    findings.sort(key=lambda f: f.seq)
    return Report(count, prev_seq, prev_hash, findings, in_flight)
