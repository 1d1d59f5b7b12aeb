"""recovery.*: seconds from a coordinator's start to serving with every migration reconciled.

The coordinator checkpoints its derived state every 100,000 events (by default); the bench puts
the last checkpoint a whole interval before the end of the log, the worst case, and also
reports a full replay of the same log without any checkpoint.

The log holds `count` events of replicated completed migrations (as `log.replay.*` builds it)
followed by ten migrations left open mid-transfer, as a crash would leave them. The clock runs
from constructing the coordinator on the file until recovery finished: replay, the new epoch,
both hosts' hellos (delivered in-process, so only the coordinator's work is timed) and the
decisions for every open migration. The baseline, in the same run, is reading the same rows
from SQLite without doing anything with them.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from coordinator import checkpoint, codec
from coordinator.app import Coordinator
from coordinator.core import NewEvent, World
from coordinator.core.evolve import fold
from coordinator.log import PendingEvent, SqliteEventStore
from tools.bench.log_bench import _bench_dir, build_log, raw_read
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

OPEN_MIGRATIONS = 10


def _leave_open(path: Path, count: int) -> None:
    """Append migrations cut off mid-transfer (the coordinator died there)."""
    from coordinator.core import inputs as I
    from tools.sim import Driver, SimHosts, running_vm

    driver = Driver()
    driver.connect("host-a", "host-b")
    hosts = SimHosts(converge_after_passes=0)  # pre-copy that has not converged yet
    for n in range(count):
        vm, mid = f"open-vm-{n}", f"open-mig-{n}"
        running_vm(driver, vm)
        hosts.leases[vm] = ("host-a", 1)
        driver.request(I.StartMigration(mid, vm, "host-b", 1, events_pb2.MigrationPolicy(), 1))
        driver.run(mid, hosts)
    store = SqliteEventStore(path)

    def started(epoch: int) -> PendingEvent:
        payload = events_pb2.CoordinatorStarted(epoch=epoch)
        return codec.to_pending(NewEvent("coordinator", payload, 1))

    store.begin_epoch(started)
    # The hosts' events of this era come from their second generation.
    tail = [e for e in driver.log if e.type != "HostConnected"]
    new = [NewEvent(e.stream, e.payload, e.time_us, e.origin_host,
                    2 if e.origin_host else 0, e.origin_seq) for e in tail]  # fmt: skip
    store.append([codec.to_pending(n) for n in new])
    store.close()


def _hello(host: str, vms: list[str]) -> host_pb2.Hello:
    snapshots = [
        common_pb2.VmObservation(
            vm=vm, process_alive=True, qmp_reachable=True,
            runstate="running" if host == "host-a" else "inmigrate", migration_status="active",
            migration_role="source" if host == "host-a" else "destination",
        )
        for vm in vms
    ]  # fmt: skip
    return host_pb2.Hello(host_id=host, generation=3, highest_epoch_seen=2, vms=snapshots)


async def _recover(path: Path, checkpoint_path: Path | None) -> tuple[float, int]:
    started = time.perf_counter()
    store = SqliteEventStore(path)
    app = Coordinator(store, host_wait=30, checkpoint_path=checkpoint_path)
    await app.start()
    vms = [f"open-vm-{n}" for n in range(OPEN_MIGRATIONS)]
    for host in ("host-a", "host-b"):
        await app.host_connected(_hello(host, vms))
    await app.recovered.wait()
    elapsed = time.perf_counter() - started
    head, _ = store.head()
    finished = [
        events_pb2.RecoveryFinished.FromString(e.payload)
        for e in store.read(from_seq=max(head - 200, 1))
        if e.type == "RecoveryFinished"
    ]
    reconciled = finished[-1].migrations_reconciled if finished else 0
    await app.close()
    await asyncio.to_thread(store.close)
    return elapsed, reconciled


def _checkpoint_before_end(path: Path, events_after: int) -> int:
    """The last periodic checkpoint a crashed coordinator left: `events_after` before the end
    of the log (a whole interval, the worst case). Returns its seq (0: the log is shorter)."""
    store = SqliteEventStore(path)
    try:
        head, _ = store.head()
        seq = head - events_after
        if seq <= 0:
            return 0
        world = World()
        fold(world, codec.decode_for_replay(store.read_rows(columns=codec.REPLAY_COLUMNS,
                                                             limit=seq)))  # fmt: skip
        (at,) = store.read(from_seq=seq, limit=1)
        checkpoint.write(checkpoint.path_for(path), world, seq, at.hash)
        return seq
    finally:
        store.close()


def bench(count: int, checkpoint_every: int = 100_000) -> dict[str, object]:
    """With the coordinator's default checkpoint interval, at its worst (a whole interval of
    events to fold after the checkpoint); a full replay of the same log is reported beside."""
    with tempfile.TemporaryDirectory(dir=_bench_dir()) as tmp:
        path = Path(tmp) / "recovery.db"
        total = build_log(path, count - OPEN_MIGRATIONS * 30)
        checkpointed = _checkpoint_before_end(path, checkpoint_every)
        _leave_open(path, OPEN_MIGRATIONS)
        n, raw_seconds = raw_read(path)
        copy = Path(tmp) / "recovery-full.db"
        shutil.copyfile(path, copy)
        elapsed, reconciled = asyncio.run(_recover(path, checkpoint.path_for(path)))
        full, _ = asyncio.run(_recover(copy, None))
    print(
        f"  recovered a log of {n:,} events ({total:,} replicated + {OPEN_MIGRATIONS} open "
        f"migrations, {reconciled} reconciled) in {elapsed:.2f}s from the checkpoint at seq "
        f"{checkpointed:,}; full replay {full:.2f}s; raw read {raw_seconds:.2f}s",
        file=sys.stderr,
    )
    return {"value": round(elapsed, 3), "unit": "s", "baseline": round(raw_seconds, 3),
            "full_replay_s": round(full, 3), "checkpoint_seq": checkpointed,
            "events": n}  # fmt: skip
