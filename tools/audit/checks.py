"""Offline checks of a log file: structure (chain, seqs, triggers, epochs, host order) and
the safety invariants the independent checker can judge."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
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


def verify(path: Path, expect_seq: int = 0, expect_hash: bytes = b"") -> Report:
    conn = open_log(path)
    findings: list[Finding] = []
    triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    for needed in ("events_append_only_update", "events_append_only_delete"):
        if needed not in triggers:
            findings.append(Finding(0, f"append-only trigger {needed} is missing"))
    prev_seq, prev_hash, epoch, count = 0, ZERO_HASH, 0, 0
    host_order: dict[str, tuple[int, int]] = {}
    checker = InvariantChecker()
    anchored = not expect_seq
    chain_ok = True
    for e in stored_events(conn):
        count += 1
        if chain_ok:
            problem = ""
            if e.seq != prev_seq + 1:
                problem = f"seq gap: expected {prev_seq + 1}, found {e.seq}"
            elif e.prev_hash != prev_hash:
                problem = "prev_hash does not match the previous event's hash"
            elif event_hash(prev_hash, e) != e.hash:
                problem = "hash does not match the event's contents"
            if problem:
                findings.append(Finding(e.seq if "gap" not in problem else prev_seq + 1, problem))
                chain_ok = False
        if e.seq == expect_seq:
            anchored = True
            if e.hash != expect_hash:
                findings.append(Finding(e.seq, "the log does not extend the anchored head"))
        if e.epoch < epoch:
            findings.append(Finding(e.seq, f"epoch went back from {epoch} to {e.epoch}"))
        epoch = max(epoch, e.epoch)
        if e.origin_host and e.origin_seq:
            mark = (e.origin_generation, e.origin_seq)
            last = host_order.get(e.origin_host)
            if last is not None and mark <= last:
                findings.append(
                    Finding(
                        e.seq,
                        f"host {e.origin_host} (generation, seq) {mark} does not follow {last}",
                    )
                )
            host_order[e.origin_host] = mark
        try:
            event = codec.from_stored(e)
        except Exception as err:
            findings.append(Finding(e.seq, f"payload of type {e.type!r} does not decode: {err}"))
            continue
        checker.feed(event)
        prev_seq, prev_hash = e.seq, e.hash
    if not anchored:
        findings.append(Finding(expect_seq, "the anchored head is missing (log truncated)"))
    findings += [
        Finding(v.seq, f"invariant {v.invariant}: {v.message}") for v in checker.violations
    ]
    findings.sort(key=lambda f: f.seq)
    return Report(count, prev_seq, prev_hash, findings)
