"""whimbrel-audit verify: a clean log passes; each kind of tampering is caught at its seq."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from coordinator.log import SqliteEventStore
from coordinator.log.chain import canonical, chain_hash
from coordinator.log.sqlite import _TRIGGERS, COLUMNS
from tools.audit.cli import main
from whimbrel.v1 import common_pb2, events_pb2


def tamper(path: Path, *sql: str, keep_triggers_off: bool = False) -> None:
    """Change rows behind the store's back, then put the triggers back as a careful forger would."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER events_append_only_update")
    conn.execute("DROP TRIGGER events_append_only_delete")
    for statement in sql:
        conn.execute(statement)
    if not keep_triggers_off:
        conn.executescript(_TRIGGERS)
    conn.commit()
    conn.close()


def forge(
    path: Path,
    *,
    epoch: int | None = None,
    origin_seq: int | None = None,
    payload: bytes | None = None,
) -> int:
    """Append a copy of the last host event (with `payload` if given) with a validly
    recomputed hash chain."""
    conn = sqlite3.connect(path)
    head_seq, head_hash, head_epoch = conn.execute(
        "SELECT seq, hash, epoch FROM events ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    row = conn.execute(
        "SELECT stream, type, time_us, origin_host, origin_generation, origin_seq, "
        "payload FROM events WHERE origin_seq > 0 ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    stream, type_, time_us, host, generation, last_origin_seq, copied = row
    payload = copied if payload is None else payload
    seq = head_seq + 1
    epoch = head_epoch if epoch is None else epoch
    origin_seq = last_origin_seq + 1 if origin_seq is None else origin_seq
    digest = chain_hash(
        head_hash,
        canonical(seq, epoch, time_us, stream, type_, host, generation, origin_seq, payload),
    )
    conn.execute("DROP INDEX IF EXISTS events_origin")
    conn.execute(
        f"INSERT INTO events ({COLUMNS}) VALUES ({', '.join('?' * 14)})",
        (
            seq,
            stream,
            type_,
            epoch,
            time_us,
            host,
            generation,
            origin_seq,
            None,
            None,
            host,
            payload,
            head_hash,
            digest,
        ),
    )
    conn.commit()
    conn.close()
    return seq


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_clean_log_verifies(log_file, capsys):
    """A log written by the store verifies with exit 0."""
    code, out = run(capsys, "verify", str(log_file))
    assert code == 0 and out.startswith("ok:")


@pytest.mark.parametrize(
    ("statements", "seq", "problem"),
    [
        (["UPDATE events SET payload = x'0a03766d32' WHERE seq = 12"], 12, "hash does not match"),
        (["DELETE FROM events WHERE seq = 7"], 7, "seq gap"),
        (
            [
                "UPDATE events SET seq = 1000 WHERE seq = 9",
                "UPDATE events SET seq = 9 WHERE seq = 10",
                "UPDATE events SET seq = 10 WHERE seq = 1000",
            ],
            9,
            "prev_hash",
        ),
        (["UPDATE events SET epoch = 0 WHERE seq = 20"], 20, "hash does not match"),
    ],
    ids=["edited-payload", "deleted-row", "reordered-rows", "edited-epoch"],
)
def test_tampering_is_found_at_its_seq(log_file, capsys, statements, seq, problem):
    """Editing, deleting, reordering or forging rows fails verification at the first bad seq."""
    tamper(log_file, *statements)
    code, out = run(capsys, "verify", str(log_file))
    assert code == 1
    assert problem in out
    assert out.startswith(f"VIOLATION at seq {seq}:")


def test_an_unnumbered_host_event_is_found_unless_it_is_a_hellos(log_file, capsys):
    """The coordinator writes a hello's HostConnected and snapshots without a seq; a host's
    event without one (re-chained, so the chain verifies) escaped the order check."""
    seq = forge(log_file, origin_seq=0)
    code, out = run(capsys, "verify", str(log_file))
    assert code == 1 and out.startswith(f"VIOLATION at seq {seq}: invariant 7: host ")
    assert "carries no seq" in out


def test_forged_host_event_with_valid_chain_is_found_by_host_order(log_file, capsys):
    """A re-chained forged host event that repeats a host seq breaks per-host order."""
    seq = forge(log_file, origin_seq=1)
    code, out = run(capsys, "verify", str(log_file))
    assert code == 1 and out.startswith(f"VIOLATION at seq {seq}:") and "does not follow" in out


def test_event_spliced_under_old_epoch_is_found(log_file, capsys):
    """A re-chained event appended under an older epoch than the log's is reported."""
    seq = forge(log_file, epoch=0)  # the log's events carry epoch 1
    code, out = run(capsys, "verify", str(log_file))
    assert code == 1 and f"at seq {seq}: invariant 5: epoch went back" in out


def test_an_undecodable_payload_is_reported_once_and_the_chain_goes_on(log_file, capsys):
    """A chained event whose payload does not decode is reported at its seq; the valid event
    after it is not a seq gap (the chain covers stored bytes, decodable or not)."""
    conn = sqlite3.connect(log_file)
    (good,) = conn.execute(
        "SELECT payload FROM events WHERE origin_seq > 0 ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    conn.close()
    bad = forge(log_file, payload=b"\xff")
    forge(log_file, payload=good)
    code, out = run(capsys, "verify", str(log_file))
    assert code == 1
    assert [line.split(":")[0] for line in out.splitlines() if "VIOLATION" in line] == [
        f"VIOLATION at seq {bad}"
    ]
    assert "does not decode" in out and "seq gap" not in out


def test_truncation_is_found_against_an_anchored_head(log_file, capsys):
    """A log cut after its head was anchored elsewhere fails `verify --expect-head`."""
    _, head = run(capsys, "head", str(log_file))
    last = int(head.split(":")[0])
    tamper(log_file, f"DELETE FROM events WHERE seq > {last - 3}")
    code, out = run(capsys, "verify", str(log_file), "--expect-head", head.strip())
    assert code == 1 and "anchored head is missing" in out
    code, _ = run(capsys, "verify", str(log_file))
    assert code == 0  # without the anchor, a clean prefix is indistinguishable from a full log


def test_missing_triggers_are_a_violation(log_file, capsys):
    """A log whose append-only triggers were dropped is reported."""
    tamper(log_file, keep_triggers_off=True)
    code, out = run(capsys, "verify", str(log_file))
    assert code == 1 and "append-only trigger" in out


def test_unreadable_file_exits_2(tmp_path, capsys):
    """A file that is not a log exits 2."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    assert main(["verify", str(junk)]) == 2


def test_state_at_seq_and_time_shows_history(log_file, capsys):
    """`state --at` / `--at-time` show the VM migrating mid-way and its lease moved later."""

    store = SqliteEventStore(log_file)
    events = list(store.read())
    store.close()
    requested = next(e for e in events if e.type == "MigrationRequested")
    code, out = run(capsys, "state", str(log_file), "--at", str(requested.seq), "--json")
    mid = json.loads(out)
    assert code == 0 and mid["vms"]["vm-1"]["status"] == "migrating"
    assert mid["migrations"]["m-1"]["phase"] == "queued"  # admitted by the next event
    latest = str(max(e.time_us for e in events))
    code, out = run(capsys, "state", str(log_file), "--at-time", latest, "--json")
    end = json.loads(out)
    # The fixture's post-copy is past its point of no return, pages still flowing.
    assert end["vms"]["vm-1"]["lease_holder"] == "host-b"
    assert end["migrations"]["m-1"]["phase"] == "finishing"
    assert end["migrations"]["m-1"]["point_of_no_return_passed"]
    code, out = run(capsys, "state", str(log_file), "--at", str(requested.seq - 1))
    assert "vm-1" in out and "migrating" not in out


def test_final_reports_a_migration_left_in_flight(log_file, capsys):
    """The fixture's migration never finished: in flight normally, invariant 8 with --final."""
    code, out = run(capsys, "verify", str(log_file))
    assert code == 0 and "in flight: m-1" in out
    code, out = run(capsys, "verify", str(log_file), "--final", "--json")
    report = json.loads(out)
    assert code == 1
    problems = [f["problem"] for f in report["findings"]]
    assert any(p.startswith("invariant 8: migration m-1 never finished") for p in problems)


def _issued(
    seq: int, command_id: str, host: str, kind: int = events_pb2.COMMAND_KIND_ANNOUNCE
) -> object:
    from coordinator.core.events import Event

    payload = events_pb2.CommandIssued(
        command_id=command_id, migration_id="m-1", host_id=host, vm="vm-1", kind=kind, attempt=1
    )
    return Event(seq, "migration/m-1", "CommandIssued", 1, seq, payload)


def test_invariant_6_commands_answered_or_superseded() -> None:
    """A migration that ends while a connected host still owes an answer breaks invariant 6;
    a retry or the host's disconnection supersedes the unanswered command."""
    from coordinator.core.events import Event
    from coordinator.core.invariants import InvariantChecker

    def ev(seq: int, payload: object) -> Event:
        return Event(seq, "migration/m-1", type(payload).__name__, 1, seq, payload)

    requested = events_pb2.MigrationRequested(
        migration_id="m-1", vm="vm-1", source="host-a", destination="host-b"
    )
    connected = [ev(1, events_pb2.HostConnected(host_id="host-a", generation=1)),
                 ev(2, events_pb2.HostConnected(host_id="host-b", generation=1))]  # fmt: skip
    finished = ev(
        9,
        events_pb2.MigrationFinished(
            migration_id="m-1", phase=common_pb2.MIGRATION_PHASE_ROLLED_BACK
        ),
    )
    unanswered = [*connected, ev(3, requested), _issued(4, "m-1/1/1-x", "host-b"), finished]
    violations = InvariantChecker().check(unanswered)  # type: ignore[arg-type]
    assert [(v.seq, v.invariant) for v in violations] == [(9, 6)]
    retried = [*unanswered[:4], _issued(5, "m-1/1/2-x", "host-b"),
               ev(6, events_pb2.CommandSucceeded(command_id="m-1/1/2-x")), finished]  # fmt: skip
    assert InvariantChecker().check(retried) == []  # type: ignore[arg-type]
    host_gone = [*unanswered[:4], ev(5, events_pb2.HostDisconnected(host_id="host-b")), finished]
    assert InvariantChecker().check(host_gone) == []  # type: ignore[arg-type]
    in_flight = unanswered[:4]
    assert InvariantChecker().check(in_flight) == []  # type: ignore[arg-type]
    final = InvariantChecker().check_quiescent(in_flight)  # type: ignore[arg-type]
    assert sorted((v.seq, v.invariant) for v in final) == [(3, 8), (4, 6)]


def _observed(seq: int, host: str, *, alive: bool, runstate: str) -> object:
    from coordinator.core.events import Event

    observation = common_pb2.VmObservation(vm="vm-1", process_alive=alive, runstate=runstate)
    payload = events_pb2.VmObserved(observation=observation, reason="hello")
    return Event(seq, f"host/{host}", "VmObserved", 1, seq, payload, origin_host=host)


@pytest.mark.parametrize(
    ("alive", "runstate", "violated"),
    [
        (True, "finish-migrate", False),
        (False, "", False),
        (True, "running", True),
        (True, "", True),
    ],
)
def test_invariant_2_reads_a_restarted_hosts_word_that_the_source_stopped(
    alive: bool, runstate: str, violated: bool
) -> None:
    """A hostd that restarted mid-switchover missed the source's STOP; its hello's observation
    is then the only word that the source stopped. Running, or alive with QMP unreachable
    (unknown), is no such word."""
    from coordinator.core.events import Event
    from coordinator.core.invariants import InvariantChecker

    def ev(seq: int, payload: object, origin: str = "") -> Event:
        return Event(seq, "migration/m-1", type(payload).__name__, 1, seq, payload,
                     origin_host=origin)  # fmt: skip

    log = [
        ev(1, events_pb2.MigrationRequested(migration_id="m-1", vm="vm-1", source="host-a",
                                            destination="host-b", source_lease_generation=1)),
        _observed(2, "host-a", alive=alive, runstate=runstate),
        ev(3, events_pb2.LeaseReleased(vm="vm-1", holder="host-a", generation=1), "host-a"),
        ev(4, events_pb2.LeaseAcquired(vm="vm-1", holder="host-b", generation=2), "host-b"),
        ev(5, events_pb2.NetworkChanged(vm="vm-1", state=events_pb2.NETWORK_STATE_ENABLED),
           "host-b"),
        _issued(6, "m-1/1/1-resume", "host-b", events_pb2.COMMAND_KIND_RESUME_VM),
    ]  # fmt: skip
    violations = InvariantChecker().check(log)  # type: ignore[arg-type]
    found = [(v.seq, v.message) for v in violations if v.invariant == 2]
    expected = [(6, "cont on destination host-b before: source stopped")] if violated else []
    assert found == expected
