"""The migration connection breaks during post-copy (a relay the test controls cuts it): both
ends pause, and the coordinator recovers them (migrate-recover on the destination, migrate
resume on the source) through the same relay, then completes. A link that stays down ends in a
fence once the bounded attempts are used: in plaintext QEMU 7.2's source sits in
postcopy-recover and never reports the failed attempt (the coordinator times it out); over TLS
it stays in postcopy-paused, silently too, and hostd fails the resume."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.qemu.scenario import (
    PHASE,
    assert_outcome,
    migration_status,
    start_migration,
    wait_destination_running,
)
from tools.cluster import Cluster
from tools.guest import random_ram
from tools.tcp_proxy import TLS_HANDSHAKE, TcpProxy
from whimbrel.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.qemu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postcopy_through_relay(
    tmp_path: Path,
    recovery_attempt_timeout_ms: int = 0,
    max_recovery_attempts: int = 0,
    migration_tls: bool = True,
    progress_timeout_s: int = 0,
) -> Iterator[tuple[Cluster, TcpProxy, int]]:
    """Two hosts whose migration link goes through a relay (host-b listens on a fixed port and
    tells sources the relay's), and a post-copy migration of a 64 MiB random-RAM guest whose
    destination already runs. Yields the cluster, the relay and the log head before the
    migration."""
    port = free_port()
    with TcpProxy(port) as proxy:
        cluster = Cluster(tmp_path)
        cluster.hostd_args["host-b"] = [
            "--migration-port", str(port), "--migration-advertise", f"127.0.0.1:{proxy.port}",
        ]  # fmt: skip
        if not migration_tls:
            cluster.hostd_args["host-a"] = ["--no-migration-tls"]
            cluster.hostd_args["host-b"].append("--no-migration-tls")
        try:
            cluster.start("host-a", "host-b")
            cluster.define_and_start("vm-1", "host-a", ram_file=random_ram(tmp_path / "ram", 64))
            head = cluster.head()
            start_migration(cluster, common_pb2.MIGRATION_MODE_POSTCOPY,
                            recovery_attempt_timeout_ms=recovery_attempt_timeout_ms,
                            max_recovery_attempts=max_recovery_attempts,
                            progress_timeout_s=progress_timeout_s,
                            max_bandwidth=1 << 20, max_postcopy_bandwidth=8 << 20)  # fmt: skip
            wait_destination_running(cluster, head)
            yield cluster, proxy, head
        finally:
            cluster.teardown()


def test_cut_during_postcopy_is_recovered(tmp_path: Path) -> None:
    with postcopy_through_relay(tmp_path) as (cluster, proxy, head):
        assert proxy.accepted == 1
        proxy.cut()
        cluster.wait_event(migration_status("host-a", "postcopy-paused"), from_seq=head)
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
        assert final.postcopy
        events = cluster.events()
        decided = [e for e in events if isinstance(e.payload, events_pb2.PostcopyRecoveryDecided)]
        assert len(decided) >= 1 and proxy.accepted >= 2  # resumed through the relay
        kinds = {
            e.payload.kind for e in events if isinstance(e.payload, events_pb2.CommandSucceeded)
        }
        assert {events_pb2.COMMAND_KIND_RECOVER_INCOMING,
                events_pb2.COMMAND_KIND_RESUME_MIGRATION} <= kinds  # fmt: skip
        # Over TLS (the cluster's default): the first stream and the resumed one opened with a
        # TLS handshake; tls-hostname names the destination, not the relay's address.
        assert all(o.startswith(TLS_HANDSHAKE) for o in proxy.openings), proxy.openings


def test_a_link_that_carries_nothing_is_paused_on_both_ends_and_recovered(tmp_path: Path) -> None:
    """The relay stops relaying without closing anything (a black hole): neither QEMU gets an
    error, and the destination's guest would wait for its pages for good. The source's samples
    show no byte sent for the policy's progress timeout (2 s here; hostd samples every 5 s), so
    the coordinator pauses both ends (migrate-pause), and the post-copy recovery reconnects
    them through the relay, which relays new connections: the migration completes on host-b."""
    with postcopy_through_relay(tmp_path, progress_timeout_s=2) as (cluster, proxy, head):
        assert proxy.accepted == 1
        proxy.freeze()
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
        assert final.postcopy
        events = [e for e in cluster.events() if e.seq > head]
        pauses = [e.payload for e in events if isinstance(e.payload, events_pb2.CommandIssued)
                  and e.payload.kind == events_pb2.COMMAND_KIND_PAUSE_MIGRATION]  # fmt: skip
        assert sorted(p.host_id for p in pauses) == ["host-a", "host-b"], pauses
        assert all(p.args.reason.startswith("post-copy wedged: the source sent nothing")
                   for p in pauses), pauses  # fmt: skip
        paused = {h for h in ("host-a", "host-b")
                  if any(migration_status(h, "postcopy-paused")(e) for e in events)}  # fmt: skip
        assert paused == {"host-a", "host-b"}
        recovered = [e for e in events if isinstance(e.payload, events_pb2.CommandSucceeded)
                     and e.payload.kind == events_pb2.COMMAND_KIND_RESUME_MIGRATION]  # fmt: skip
        assert recovered and proxy.accepted >= 2  # resumed through the relay


def test_a_healthy_post_copy_is_not_taken_for_a_wedged_one(tmp_path: Path) -> None:
    """The same progress timeout of 2 s on a link that works: post-copy sends for seconds (64
    MiB at 8 MiB/s), sampled every 5 s, and every sample shows bytes moved, so nothing is
    paused and the migration completes without a recovery."""
    with postcopy_through_relay(tmp_path, progress_timeout_s=2) as (cluster, proxy, head):
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
        events = [e for e in cluster.events() if e.seq > head]
        samples = [e.payload for e in events
                   if isinstance(e.payload, events_pb2.MigrationStatsSampled)
                   and e.payload.status == "postcopy-active"]  # fmt: skip
        assert samples, "no sample taken during post-copy"
        issued = {e.payload.kind for e in events if isinstance(e.payload, events_pb2.CommandIssued)}
        assert events_pb2.COMMAND_KIND_PAUSE_MIGRATION not in issued
        assert final.postcopy and proxy.accepted == 1


def test_link_that_stays_down_times_out_the_recovery_and_fences(tmp_path: Path) -> None:
    """The relay cuts the link and drops every new connection; migrations in plaintext: QEMU
    7.2's source then sits in postcopy-recover for good. The attempt times out (policy: 2 s
    here), the source cannot be resumed again, and once the bounded attempts are used both ends
    are fenced: the VM is recorded lost, its memory being split between two hosts that cannot
    talk."""
    with postcopy_through_relay(tmp_path, recovery_attempt_timeout_ms=2000,
                                migration_tls=False) as (cluster, proxy, head):  # fmt: skip
        proxy.refusing = True
        proxy.cut()
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_FENCED, runs_on=None)
        assert "post-copy recovery failed" in final.reason
        stuck = cluster.wait_event(migration_status("host-a", "postcopy-recover"), from_seq=head)
        assert stuck.seq > head


def test_link_that_stays_down_over_tls_fails_the_resume_and_fences(tmp_path: Path) -> None:
    """The same over TLS: the source's handshake fails and QEMU 7.2 stays in postcopy-paused
    without a word; hostd fails the resume, so the coordinator does not wait on it for good,
    and with its attempts used (two: the policy) fences both ends."""
    with postcopy_through_relay(tmp_path, max_recovery_attempts=2) as (cluster, proxy, _):
        proxy.refusing = True
        proxy.cut()
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_FENCED, runs_on=None)
        assert "post-copy recovery failed" in final.reason
        failed = [e.payload for e in cluster.events()
                  if isinstance(e.payload, events_pb2.CommandFailed)
                  and e.payload.kind == events_pb2.COMMAND_KIND_RESUME_MIGRATION]  # fmt: skip
        assert failed and "still postcopy-paused" in failed[0].error


def test_a_resume_lost_to_a_source_restart_is_recovered_by_a_second_migrate_recover(
    tmp_path: Path,
) -> None:
    """The link is cut during post-copy; the destination listens again (migrate-recover) and
    the source's hostd is killed before it runs the resume. The next attempt's migrate-recover
    is accepted by QEMU 7.2 (it gives up the earlier listener first, so the same port serves
    again), the restarted source resumes there, and the migration completes. The QMP simulator
    refused that second migrate-recover, which made its runs fence this VM (shell simulation
    seed 4575): this is the ground truth it now follows."""
    with postcopy_through_relay(tmp_path) as (cluster, proxy, _):
        at_resume = cluster.head()
        cluster.processes["host-a"].stop()
        cluster.start_hostd("host-a", failpoints="hostd.before-execute.resume-migration=stop")
        cluster.wait_hosts("host-a", from_seq=at_resume + 1)
        proxy.cut()
        cluster.wait_frozen("host-a")
        cluster.kill_process("host-a")
        cluster.start_hostd("host-a")
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, runs_on="host-b")
        assert final.postcopy
        recovers = [
            e.payload
            for e in cluster.events()
            if isinstance(e.payload, events_pb2.CommandSucceeded)
            and e.payload.kind == events_pb2.COMMAND_KIND_RECOVER_INCOMING
        ]
        # Both attempts listened, on host-b's one migration port (behind the relay).
        assert len(recovers) >= 2 and recovers[-1].result.uri == recovers[0].result.uri
