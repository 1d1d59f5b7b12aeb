"""whimbrel-audit on copies of the log of a real migration: each kind of tampering is found at
its seq, and the untouched copy verifies as final (every invariant, nothing in flight)."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.test_audit_verify import forge, tamper
from tools.audit.cli import main as audit
from tools.cluster import Cluster
from whimbrel.v1 import common_pb2, migration_pb2

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def real_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The log of a completed pre-copy migration between two real hostd with real QEMU."""
    cluster = Cluster(tmp_path_factory.mktemp("real-log"))
    try:
        cluster.start("host-a", "host-b")
        cluster.define_and_start("vm-1", "host-a")
        cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
            vm="vm-1", destination="host-b", mode=common_pb2.MIGRATION_MODE_PRECOPY,
            migration_id="m-1"))  # fmt: skip
        assert cluster.watch("m-1").phase == common_pb2.MIGRATION_PHASE_COMPLETED
    finally:
        cluster.teardown()
    yield cluster.db


@pytest.fixture
def copy(real_log: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.db"
    shutil.copyfile(real_log, target)
    return target


def seq_of(db: Path, where: str) -> int:
    with sqlite3.connect(db) as conn:
        (seq,) = conn.execute(f"SELECT min(seq) FROM events WHERE {where}").fetchone()
    conn.close()
    assert seq, where
    return int(seq)


def first_violation(db: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert audit(["verify", str(db), *extra]) == 1
    return capsys.readouterr().out.splitlines()[0]


def test_untouched_real_log_verifies_as_final(copy: Path, capsys):
    assert audit(["verify", str(copy), "--final"]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_edited_payload(copy: Path, capsys):
    seq = seq_of(copy, "type = 'LeaseAcquired' AND origin_host = 'host-b'")
    # CAST: SQLite's || yields text, which the audit reports as a malformed row before any hash.
    tamper(copy, f"UPDATE events SET payload = CAST(payload || x'00' AS BLOB) WHERE seq = {seq}")
    line = first_violation(copy, capsys)
    assert line.startswith(f"VIOLATION at seq {seq}:") and "hash does not match" in line


def test_deleted_row(copy: Path, capsys):
    seq = seq_of(copy, "type = 'QmpEventReceived'")
    tamper(copy, f"DELETE FROM events WHERE seq = {seq}")
    line = first_violation(copy, capsys)
    assert line.startswith(f"VIOLATION at seq {seq}:") and "seq gap" in line


def test_reordered_rows(copy: Path, capsys):
    seq = seq_of(copy, "type = 'CommandIssued'")
    tamper(
        copy,
        f"UPDATE events SET seq = -1 WHERE seq = {seq}",
        f"UPDATE events SET seq = {seq} WHERE seq = {seq + 1}",
        f"UPDATE events SET seq = {seq + 1} WHERE seq = -1",
    )
    line = first_violation(copy, capsys)
    assert line.startswith(f"VIOLATION at seq {seq}:") and "prev_hash" in line


def test_truncated_after_anchoring(copy: Path, capsys):
    assert audit(["head", str(copy)]) == 0
    head = capsys.readouterr().out.strip()
    last = int(head.split(":")[0])
    tamper(copy, f"DELETE FROM events WHERE seq > {last - 5}")
    line = first_violation(copy, capsys, "--expect-head", head)
    assert line.startswith(f"VIOLATION at seq {last}:") and "anchored head is missing" in line


def test_forged_host_event(copy: Path, capsys):
    seq = forge(copy, origin_seq=1)
    line = first_violation(copy, capsys)
    assert line.startswith(f"VIOLATION at seq {seq}:") and "does not follow" in line


def test_event_spliced_under_an_old_epoch(copy: Path, capsys):
    seq = forge(copy, epoch=0)
    line = first_violation(copy, capsys)
    assert line.startswith(f"VIOLATION at seq {seq}:") and "invariant 5: epoch went back" in line


def test_why_follows_causes_back_to_the_request_and_to_observations(
    real_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`why` on the first command leads back, through the migration's admission under the
    limits, to the operator's request and its principal; on
    the migration's end it leads, seq by seq backwards, to a host's observation."""
    from coordinator import codec
    from tools.audit import why
    from tools.audit.checks import open_log, stored_events

    events = [codec.from_stored(s) for s in stored_events(open_log(real_log))]
    prepare = next(e for e in events if e.type == "CommandIssued" and e.payload.migration_id)
    links = why.chain(events, prepare.seq)
    assert [link.type for link in links] == [
        "CommandIssued",
        "MigrationAdmitted",
        "MigrationRequested",
    ]
    assert links[-1].who == "spiffe://whimbrel/user/admin"
    finished = next(e for e in events if e.type == "MigrationFinished")
    links = why.chain(events, finished.seq)
    seqs = [link.seq for link in links]
    assert seqs[0] == finished.seq and seqs == sorted(seqs, reverse=True) and len(seqs) > 2
    assert "generation" in links[-1].who  # a host's own report started it
    assert audit(["why", str(real_log), str(finished.seq)]) == 0
    assert f"{finished.seq}" in capsys.readouterr().out
    assert audit(["why", str(real_log), "999999"]) == 1
