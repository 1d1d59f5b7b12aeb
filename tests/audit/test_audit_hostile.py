"""whimbrel-audit on hostile logs: a forger with write access to the file (who can re-link the
hash chain) gets a finding at the seq at fault or a one-line refusal, never a traceback, a
false "ok", a different file checked, a blown memory budget or a forged line on the terminal."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf.message import Message

from coordinator.core import payload_class
from coordinator.log import StoredEvent
from coordinator.log.chain import ZERO_HASH, event_hash
from coordinator.log.sqlite import _TRIGGERS, READ_COLUMNS
from tools.audit.cli import main
from tools.audit.logfile import MAX_VALUE_BYTES, open_log
from whimbrel.v1 import events_pb2

TRIGGER_NAMES = ("events_append_only_update", "events_append_only_delete")


def rewrite(path: Path, *sql: str, rechain: bool = True, triggers: str = _TRIGGERS) -> None:
    """Run `sql` with the append-only triggers dropped, re-link the hash chain with the
    project's own hash (as a forger with write access can), and create `triggers`."""
    conn = sqlite3.connect(path)
    for name in TRIGGER_NAMES:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    for statement in sql:
        conn.execute(statement)
    if rechain:
        prev = ZERO_HASH
        for row in conn.execute(f"SELECT {READ_COLUMNS} FROM events ORDER BY seq").fetchall():
            event = StoredEvent(*row)
            digest = event_hash(prev, event)
            conn.execute(
                "UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, event.seq)
            )
            prev = digest
    conn.commit()
    conn.executescript(triggers)
    conn.close()


def edit_payload(path: Path, seq: int, change: Callable[[Message], None]) -> None:
    """Decode the payload at `seq`, change it, store it back and re-link the chain."""
    conn = sqlite3.connect(path)
    type_, payload = conn.execute(
        "SELECT type, payload FROM events WHERE seq = ?", (seq,)
    ).fetchone()
    conn.close()
    message = payload_class(type_).FromString(payload)
    change(message)
    rewrite(
        path,
        f"UPDATE events SET payload = X'{message.SerializeToString().hex()}' WHERE seq = {seq}",
    )


def append(path: Path, stream: str, payload: Message, epoch: int) -> None:
    """Append a coordinator event under `epoch` with a valid chain."""
    rewrite(
        path,
        "INSERT INTO events (seq, stream, type, epoch, time_us, origin_host, origin_generation, "
        f"origin_seq, payload, prev_hash, hash) SELECT MAX(seq) + 1, '{stream}', "
        f"'{payload.DESCRIPTOR.name}', {epoch}, MAX(time_us), '', 0, 0, "
        f"X'{payload.SerializeToString().hex()}', X'', X'' FROM events",
    )


def last_seq(path: Path) -> int:
    conn = sqlite3.connect(path)
    (seq,) = conn.execute("SELECT MAX(seq) FROM events").fetchone()
    conn.close()
    return int(seq)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "assignment",
    [
        "epoch = 'x'",
        "epoch = 1.5",
        "epoch = 1e19",
        "epoch = -1",
        "origin_generation = 'x'",
        "origin_host = NULL",
        "stream = CAST(X'ff' AS TEXT)",
        "payload = 'text'",
        "hash = 'deadbeef'",
    ],
)
def test_a_column_of_the_wrong_type_is_a_finding_at_its_seq(log_file, capsys, assignment):
    """A row whose column holds the wrong type or an out-of-range number is reported at its
    seq, in text and in JSON; it never crashes verify."""
    rewrite(log_file, f"UPDATE events SET {assignment} WHERE seq = 5", rechain=False)
    code, out, _ = run(capsys, "verify", str(log_file))
    assert code == 1
    assert out.startswith("VIOLATION at seq 5: malformed row:")
    code, out, _ = run(capsys, "verify", str(log_file), "--json")
    report = json.loads(out)
    assert code == 1 and report["findings"][0]["seq"] == 5


def test_head_refuses_a_head_row_of_the_wrong_type(log_file, capsys):
    """`head` on a log whose last hash is text exits 2 naming that seq."""
    seq = last_seq(log_file)
    rewrite(log_file, f"UPDATE events SET hash = 'deadbeef' WHERE seq = {seq}", rechain=False)
    code, out, err = run(capsys, "head", str(log_file))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and f"seq {seq}:" in err


READERS = {
    "timeline": ["timeline", "{db}", "--migration", "m-1"],
    "state": ["state", "{db}", "--at", "40"],
    "export": ["export", "{db}"],
    "why": ["why", "{db}", "33"],
    "whatif": ["whatif", "{db}", "--migration", "m-1", "--policy", "default"],
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "damage",
    [
        "type = 'Bogus'",
        "payload = X'ffffffff'",
        "payload = 'text'",
        "epoch = 'x'",
    ],
)
def test_every_reader_refuses_an_undecodable_event_at_its_seq(log_file, capsys, reader, damage):
    """timeline, state, export, why and whatif exit 2 with one line naming the seq of an event
    they cannot decode."""
    rewrite(log_file, f"UPDATE events SET {damage} WHERE seq = 5", rechain=False)
    code, _, err = run(capsys, *(a.format(db=log_file) for a in READERS[reader]))
    assert code == 2
    assert len(err.splitlines()) == 1 and "seq 5:" in err


def test_refusals_escape_what_the_log_says(log_file, capsys):
    """A refusal quoting the log's text shows its control characters escaped, on one line."""
    rewrite(log_file, "UPDATE events SET type = 'Bogus\r\x1b[2K\nok' WHERE seq = 5", rechain=False)
    code, _, err = run(capsys, "state", str(log_file), "--at", "40")
    assert code == 2
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "\r" not in err


@pytest.mark.parametrize(
    ("seq", "change"),
    [
        (20, lambda p: setattr(p, "data_json", "[]")),  # the source's MIGRATION
        (24, lambda p: setattr(p, "data_json", "[]")),  # the destination's MIGRATION
        (20, lambda p: setattr(p, "data_json", "not json")),
        (11, lambda p: setattr(p, "kind", 99)),
    ],
    ids=["source-list", "destination-list", "source-not-json", "kind-99"],
)
def test_odd_events_in_a_valid_chain_do_not_stop_the_checks(log_file, capsys, seq, change):
    """A chained event the checker cannot make sense of is at most a finding at its seq;
    the checks after it still run (here: invariant 8 at the end, with --final)."""
    edit_payload(log_file, seq, change)
    code, out, _ = run(capsys, "verify", str(log_file), "--final", "--json")
    report = json.loads(out)
    assert code == 1
    problems = [(f["seq"], f["problem"]) for f in report["findings"]]
    assert any(p.startswith("invariant 8: migration m-1 never finished") for _, p in problems)
    if seq == 11:
        assert any(s == 11 and "kind 99" in p for s, p in problems)


def test_whatif_reads_odd_qmp_data_as_no_data(log_file, capsys):
    """whatif takes a MIGRATION_PASS whose data is not an object as saying nothing."""
    edit_payload(log_file, 19, lambda p: setattr(p, "data_json", "[]"))
    code, _, err = run(capsys, "whatif", str(log_file), "--migration", "m-1", "--policy", "x")
    assert code == 1 and "has not ended" in err


def test_readers_fold_odd_qmp_data_as_none(log_file, capsys):
    """QMP data that is not a JSON object (which the host stream refuses, and a log written
    before it did may hold) folds as no data: state reads the log to its end."""
    edit_payload(log_file, 20, lambda p: setattr(p, "data_json", "not json"))
    code, out, err = run(capsys, "state", str(log_file), "--at", "40")
    assert code == 0 and err == "" and "vm-1" in out


FAKE_TRIGGERS = {
    "on-meta": """
        CREATE TRIGGER events_append_only_update AFTER INSERT ON meta BEGIN SELECT 1; END;
        CREATE TRIGGER events_append_only_delete AFTER INSERT ON meta BEGIN SELECT 1; END;
    """,
    "no-op": _TRIGGERS.replace(
        "SELECT RAISE(ABORT, 'events are append-only: UPDATE is not allowed')", "SELECT 1"
    ),
    "never": _TRIGGERS.replace("BEFORE DELETE ON events", "BEFORE DELETE ON events WHEN 0"),
    "after": _TRIGGERS.replace("BEFORE UPDATE", "AFTER UPDATE"),
}


@pytest.mark.parametrize("fake", FAKE_TRIGGERS)
def test_append_only_triggers_must_be_the_real_ones(log_file, capsys, fake):
    """A trigger with the right name that does not abort UPDATE or DELETE on events is a
    finding."""
    rewrite(log_file, rechain=False, triggers=FAKE_TRIGGERS[fake])
    code, out, _ = run(capsys, "verify", str(log_file))
    assert code == 1 and "VIOLATION at seq 0: append-only trigger events_append_only_" in out


def _command(seq_source: Path) -> Message:
    conn = sqlite3.connect(seq_source)
    (payload,) = conn.execute(
        "SELECT payload FROM events WHERE type = 'CommandIssued' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    conn.close()
    return events_pb2.CommandIssued.FromString(payload)


def test_appending_under_a_stale_epoch_is_found(log_file, capsys):
    """An epoch's start stored under the old epoch, and an event appended under the old epoch
    after it, are both invariant 5."""
    head = last_seq(log_file)
    command = _command(log_file)
    append(log_file, "coordinator", events_pb2.CoordinatorStarted(epoch=2), epoch=1)
    append(log_file, "migration/m-1", command, epoch=1)
    code, out, _ = run(capsys, "verify", str(log_file))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(f"VIOLATION at seq {head + 1}: invariant 5: ")
    assert lines[1].startswith(f"  also at seq {head + 2}: invariant 5: ")
    assert len(lines) == 2


@pytest.mark.parametrize(
    ("payload", "epoch"),
    [(events_pb2.CoordinatorStarted(epoch=1), 1), (events_pb2.CommandIssued(), 2)],
    ids=["started-again", "epoch-without-start"],
)
def test_an_epoch_starts_once_with_its_start(log_file, capsys, payload, epoch):
    """An epoch started twice, or used without a CoordinatorStarted first, is invariant 5."""
    head = last_seq(log_file)
    append(log_file, "coordinator", payload, epoch=epoch)
    code, out, _ = run(capsys, "verify", str(log_file))
    assert code == 1 and out.startswith(f"VIOLATION at seq {head + 1}: invariant 5: ")


@pytest.mark.parametrize("name", ["log#tampered.db", "log?x.db", "50%.db", "log%23x.db"])
def test_a_path_with_uri_characters_opens_that_file(log_file, capsys, name):
    """verify checks the file it is given, whatever characters its name holds (here a tampered
    copy beside a clean file named `log`)."""
    shutil.copy(log_file, log_file.parent / "log")
    tampered = log_file.parent / name
    shutil.copy(log_file, tampered)
    rewrite(tampered, "UPDATE events SET payload = X'0a03766d32' WHERE seq = 12", rechain=False)
    code, out, _ = run(capsys, "verify", str(tampered))
    assert code == 1 and out.startswith("VIOLATION at seq 12:")
    code, _, _ = run(capsys, "verify", str(log_file.parent / "log"))
    assert code == 0


SCHEMAS = {
    "generated-payload": (
        '"payload" BLOB NOT NULL',
        '"payload" BLOB GENERATED ALWAYS AS (zeroblob(1000000)) VIRTUAL',
    ),
    "generated-stored": ('"hash" BLOB NOT NULL', '"hash" BLOB NOT NULL, "x" AS (1) STORED'),
    "extra-column": ('"hash" BLOB NOT NULL', '"hash" BLOB NOT NULL, "extra" TEXT'),
    "missing-column": ('"host" TEXT,', ""),
}


@pytest.mark.parametrize("schema", SCHEMAS)
def test_an_events_table_of_another_shape_is_refused(log_file, tmp_path, capsys, schema):
    """An events table whose columns are not exactly the log's (a generated column that
    expands a small file into gigabytes on read, say) is refused before any row is read."""
    old, new = SCHEMAS[schema]
    source = sqlite3.connect(log_file)
    (create,) = source.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()
    source.close()
    assert old in create
    crafted = tmp_path / "crafted.db"
    conn = sqlite3.connect(crafted)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
    conn.execute(create.replace(old, new))
    conn.executescript(_TRIGGERS)
    conn.close()
    code, out, err = run(capsys, "verify", str(crafted))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "events" in err


def test_a_virtual_events_table_is_refused(tmp_path, capsys):
    """An events table that is a virtual table is refused."""
    crafted = tmp_path / "crafted.db"
    conn = sqlite3.connect(crafted)
    conn.execute("CREATE VIRTUAL TABLE events USING fts5(stream, type)")
    conn.close()
    code, _, err = run(capsys, "verify", str(crafted))
    assert code == 2 and "events" in err


def test_a_value_larger_than_any_event_is_refused_at_its_seq(log_file, capsys):
    """A stored value above the cap on value sizes is not read: exit 2 naming where."""
    cap = MAX_VALUE_BYTES
    assert open_log(log_file).getlimit(sqlite3.SQLITE_LIMIT_LENGTH) == cap
    rewrite(
        log_file,
        f"UPDATE events SET payload = zeroblob({cap + 1}) WHERE seq = 5",
        rechain=False,
    )
    code, _, err = run(capsys, "verify", str(log_file))
    assert code == 2 and len(err.splitlines()) == 1 and "seq 5 cannot be read" in err


def _printable(text: str) -> bool:
    return all(c.isprintable() or c == "\n" for c in text)


def test_text_output_escapes_control_characters(log_file, capsys):
    """Host names and ids from the log show their control characters escaped: a line of
    verify, state, timeline or why cannot be rewritten or forged from the log."""
    forged = "\r\x1b[2Kok: 33 events"
    rewrite(
        log_file,
        "DROP INDEX events_origin",  # the two hosts become one: (generation, seq) repeats
        f"UPDATE events SET origin_host = '{forged}' WHERE seq IN (2, 3)",
    )
    edit_payload(log_file, 2, lambda p: setattr(p, "host_id", "host-a\nvm-9 running"))
    edit_payload(log_file, 11, lambda p: setattr(p, "host_id", "host-b\x1b[8m"))
    code, out, _ = run(capsys, "verify", str(log_file))
    assert code == 1 and _printable(out) and "\\x1b[2Kok" in out
    assert all(line.startswith(("VIOLATION at seq", "  also at seq")) for line in out.splitlines())
    code, out, _ = run(capsys, "state", str(log_file), "--at", "40")
    assert code == 0 and _printable(out) and "host-a\\nvm-9 running" in out
    assert not any(line.startswith("vm-9") for line in out.splitlines())
    code, out, _ = run(capsys, "timeline", str(log_file), "--migration", "m-1")
    assert code == 0 and _printable(out) and "host-b\\x1b[8m" in out
    code, out, _ = run(capsys, "why", str(log_file), "11")
    assert code == 0 and _printable(out) and "host-b\\x1b[8m" in out
