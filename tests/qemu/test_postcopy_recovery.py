"""The migration connection breaks during post-copy (a relay the test controls cuts it): both
ends pause, and the coordinator recovers them (migrate-recover on the destination, migrate
resume on the source) through the same relay, then completes. (A link that stays down is only
simulated, in tests/unit/test_recovery.py: with the relay refusing, QEMU 7.2's source sits in
postcopy-recover and never reports the failed attempt.)"""

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
from tests.tcp_proxy import TcpProxy
from tools.cluster import Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.qemu


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postcopy_through_relay(
    tmp_path: Path, recovery_attempt_timeout_ms: int = 0
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
        try:
            cluster.start("host-a", "host-b")
            cluster.define_and_start("vm-1", "host-a", ram_file=random_ram(tmp_path / "ram", 64))
            head = cluster.head()
            start_migration(cluster, common_pb2.MIGRATION_MODE_POSTCOPY,
                            recovery_attempt_timeout_ms=recovery_attempt_timeout_ms,
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


def test_link_that_stays_down_times_out_the_recovery_and_fences(tmp_path: Path) -> None:
    """The relay cuts the link and drops every new connection: QEMU 7.2's source then sits in
    postcopy-recover for good. The attempt times out (policy: 2 s here), the source cannot be
    resumed again, and once the bounded attempts are used both ends are fenced: the VM is
    recorded lost, its memory being split between two hosts that cannot talk."""
    with postcopy_through_relay(tmp_path, recovery_attempt_timeout_ms=2000) as (
        cluster, proxy, head):  # fmt: skip
        proxy.refusing = True
        proxy.cut()
        final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_FENCED, runs_on=None)
        assert "post-copy recovery failed" in final.reason
        stuck = cluster.wait_event(migration_status("host-a", "postcopy-recover"), from_seq=head)
        assert stuck.seq > head
