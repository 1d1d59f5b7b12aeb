"""Host ingest: durable events per second from many hostd-like streams, through the real
coordinator.

A coordinator process is started as the tests start it (`tools.cluster.Cluster`: mutual TLS,
loopback, a fresh SQLite log). STREAMS fake hosts, each with its own host certificate
(`spiffe://whimbrel/host/ID`), open HostService.Connect, say Hello, and are each given a VM to
run (DefineVm + StartVm by the cluster's admin; the host answers the START_VM command with
CommandSucceeded, as hostd does). Then, all at once, every host reports QMP events
(QmpEventReceived MIGRATION_PASS) of its own VM, BATCH events per HostEvents message (hostd
sends what was recorded together in one message), with at most WINDOW events unacknowledged.

- value: acknowledged events / wall time from the first send to the last acknowledgement. An
  Ack covers everything up to its seq and is sent only after the commit (DESIGN.md), so every
  event counted is durable in the log;
- ack latency: per event, from the write of its message to the first Ack covering it (the
  coordinator sends a host at most one Ack per ACK_INTERVAL_S, which is in these numbers);
- coordinator CPU seconds over the same interval, from /proc/PID/stat (all threads), and its
  main thread's share (the event loop; the log writer and gRPC's threads are the rest);
- baseline: the same events appended straight to a SqliteEventStore, one append per message
  from STREAMS asyncio writers with the same window, in the same run: what the log alone
  does, so `ratio` (baseline / value) is what the gRPC path and the coordinator cost.

The clients run in this process, pre-serialized (the messages are built before the clock
starts), so they take as little as possible of the CPU the coordinator needs; their CPU seconds
(this process, all threads) are reported beside the coordinator's.
`WHIMBREL_BENCH_PROFILE=FILE` runs the coordinator under cProfile (its main thread) and writes
the stats to FILE when it stops.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator import codec
from coordinator.core import NewEvent
from coordinator.log import PendingEvent, SqliteEventStore
from tools.cluster import Cluster
from whimbrel import protocol, tls
from whimbrel.v1 import common_pb2, events_pb2, host_pb2, vm_pb2, vm_pb2_grpc

STREAMS = 100
# Events per stream after its VM started, per HostEvents message, and unacknowledged at most.
EVENTS_PER_STREAM = 500
BATCH = 10
WINDOW = 100
TARGET = 25_000
CONNECT = "/whimbrel.v1.HostService/Connect"
_PROFILE_HOOK = """
import atexit, cProfile, os, sys
if os.path.basename(sys.argv[0]) == "whimbrel-coordinator":
    _profile = cProfile.Profile()
    _profile.enable()
    atexit.register(lambda: (_profile.disable(), _profile.dump_stats(os.environ["{var}"])))
"""


def _host_id(i: int) -> str:
    return f"ingest-{i:03d}"


def _vm(i: int) -> str:
    return f"ingest-vm-{i:03d}"


def _batches(i: int) -> list[tuple[int, bytes]]:
    """(last seq, serialized HostMessage) of host i's events; seq 1 is its CommandSucceeded."""
    out = []
    seq = 1
    now = time.time_ns() // 1000
    for start in range(0, EVENTS_PER_STREAM, BATCH):
        events = []
        for n in range(start, min(start + BATCH, EVENTS_PER_STREAM)):
            seq += 1
            qmp = events_pb2.QmpEventReceived(
                vm=_vm(i), event="MIGRATION_PASS", data_json=f'{{"pass": {n % 9 + 1}}}'
            )
            events.append(
                host_pb2.HostEvent(
                    seq=seq,
                    time_us=now + n,
                    payload=events_pb2.EventPayload(qmp_event_received=qmp),
                )
            )
        message = host_pb2.HostMessage(events=host_pb2.HostEvents(events=events))
        out.append((seq, message.SerializeToString()))
    return out


@dataclass
class Host:
    """One fake hostd: its stream, its pre-built messages and what came back."""

    index: int
    files: tls.TlsFiles | None
    address: str
    batches: list[tuple[int, bytes]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    done_at: float = 0.0
    channel: Any = None
    call: Any = None

    async def connect(self) -> None:
        self.channel = tls.aio_channel(self.address, self.files)
        connect = self.channel.stream_stream(
            CONNECT,
            request_serializer=None,  # bytes, serialized before the clock starts
            response_deserializer=host_pb2.CoordinatorMessage.FromString,
        )
        self.call = connect()
        hello = host_pb2.Hello(
            host_id=_host_id(self.index), generation=1, migration_address="127.0.0.1",
            version="bench",
        )  # fmt: skip
        await self.call.write(host_pb2.HostMessage(hello=hello).SerializeToString())
        welcome = await self.call.read()
        if welcome is grpc.aio.EOF or welcome.WhichOneof("kind") != "welcome":
            raise RuntimeError(f"host {self.index}: no welcome but {welcome}")

    async def start_vm(self) -> None:
        """Answer the START_VM command as hostd would, and wait for its acknowledgement."""
        message = await self.call.read()
        if message is grpc.aio.EOF or message.WhichOneof("kind") != "command":
            raise RuntimeError(f"host {self.index}: expected START_VM, got {message}")
        command = message.command
        result = events_pb2.CommandSucceeded(
            command_id=command.command_id, attempt=command.attempt, kind=command.kind,
            vm=command.vm,
        )  # fmt: skip
        event = host_pb2.HostEvent(
            seq=1,
            time_us=time.time_ns() // 1000,
            payload=events_pb2.EventPayload(command_succeeded=result),
        )
        await self.call.write(host_pb2.HostMessage(event=event).SerializeToString())
        await self._acked_through(1)

    async def _acked_through(self, seq: int) -> int:
        while True:
            message = await self.call.read()
            if message is grpc.aio.EOF:
                raise RuntimeError(f"host {self.index}: stream ended before ack {seq}")
            if message.WhichOneof("kind") == "ack" and message.ack.seq >= seq:
                return int(message.ack.seq)

    async def report(self) -> None:
        """Send every batch within the window; note each event's acknowledgement latency."""
        sent: list[tuple[int, int, float]] = []  # (last seq, events, sent at), unacked
        acked = 1
        room = asyncio.Event()
        room.set()
        last = self.batches[-1][0]

        async def receive() -> None:
            nonlocal acked
            while acked < last:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    raise RuntimeError(f"host {self.index}: stream ended at ack {acked}")
                if message.WhichOneof("kind") != "ack":
                    continue
                acked = max(acked, message.ack.seq)
                now = time.perf_counter()
                while sent and sent[0][0] <= acked:
                    _, count, at = sent.pop(0)
                    self.latencies.extend([now - at] * count)
                room.set()
            self.done_at = time.perf_counter()

        receiver = asyncio.create_task(receive())
        previous = 1
        for seq, data in self.batches:
            while seq - acked > WINDOW:
                room.clear()
                await room.wait()
            sent.append((seq, seq - previous, time.perf_counter()))
            previous = seq
            await self.call.write(data)
        await receiver

    async def close(self) -> None:
        if self.call is not None:
            await self.call.done_writing()
        if self.channel is not None:
            await self.channel.close()


def _cpu(pid: int) -> tuple[float, float]:
    """(all threads, main thread) CPU seconds of process `pid`."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    return read(f"/proc/{pid}/stat"), read(f"/proc/{pid}/task/{pid}/stat")


def _spec(i: int, root: Path) -> common_pb2.VmSpec:
    return common_pb2.VmSpec(
        name=_vm(i), memory_mib=64, vcpus=1,
        disks=[common_pb2.Disk(path=str(root / f"{_vm(i)}.img"), format="raw")],
    )  # fmt: skip


async def _measure(cluster: Cluster, hosts: list[Host]) -> dict[str, Any]:
    admin = tls.aio_channel(
        cluster.address, cluster.identity("user", "admin").files if cluster.tls else None
    )
    vms = vm_pb2_grpc.VmServiceStub(admin)
    try:
        await asyncio.gather(*(h.connect() for h in hosts))
        for h in hosts:
            await vms.DefineVm(vm_pb2.DefineVmRequest(spec=_spec(h.index, cluster.root)))
        starting = [asyncio.create_task(h.start_vm()) for h in hosts]
        for h in hosts:
            await vms.StartVm(vm_pb2.StartVmRequest(name=_vm(h.index), host=_host_id(h.index)))
        await asyncio.gather(*starting)
        pid = cluster.processes["coordinator"].popen.pid
        cpu_before, main_before = _cpu(pid)
        clients_before = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(h.report() for h in hosts))
        elapsed = max(h.done_at for h in hosts) - start
        cpu_after, main_after = _cpu(pid)
        clients_cpu = time.process_time() - clients_before
    finally:
        await asyncio.gather(*(h.close() for h in hosts), return_exceptions=True)
        await admin.close()
    latencies = sorted(x for h in hosts for x in h.latencies)
    return {
        "events": len(latencies),
        "seconds": elapsed,
        "cpu_s": cpu_after - cpu_before,
        "main_thread_cpu_s": main_after - main_before,
        "clients_cpu_s": clients_cpu,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
    }


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def _baseline(root: Path, hosts: list[Host]) -> float:
    """The same events appended straight to the log: one append per message, STREAMS
    asyncio writers, each with WINDOW events in flight at most."""
    store = SqliteEventStore(root / "baseline.db")
    try:
        store.begin_epoch(
            lambda epoch: codec.to_pending(
                NewEvent(protocol.COORDINATOR_STREAM, events_pb2.CoordinatorStarted(epoch=epoch), 1)
            )
        )
        per_host = [[_pending(h.index, data) for _, data in h.batches] for h in hosts]

        async def write(messages: list[list[PendingEvent]]) -> None:
            window: list[asyncio.Future[Any]] = []
            in_flight = 0
            for events in messages:
                while window and in_flight + len(events) > WINDOW:
                    await window.pop(0)
                    in_flight -= BATCH
                window.append(asyncio.ensure_future(store.submit_marks(events)))
                in_flight += len(events)
            await asyncio.gather(*window)

        async def run() -> float:
            start = time.perf_counter()
            await asyncio.gather(*(write(m) for m in per_host))
            return time.perf_counter() - start

        elapsed = asyncio.run(run())
        return sum(len(m) * BATCH for m in per_host) / elapsed
    finally:
        store.close()


def _pending(i: int, data: bytes) -> list[PendingEvent]:
    """The PendingEvents the coordinator makes of one of host i's messages."""
    message = host_pb2.HostMessage.FromString(data)
    return [
        codec.to_pending(
            NewEvent(
                protocol.vm_stream(_vm(i)),
                e.payload.qmp_event_received,
                e.time_us,
                _host_id(i),
                1,
                e.seq,
            )
        )
        for e in message.events.events
    ]


def bench(streams: int = STREAMS) -> dict[str, object]:
    with tempfile.TemporaryDirectory(
        prefix="whimbrel-bench-ingest-", dir=os.environ.get("WHIMBREL_BENCH_DIR")
    ) as tmp:
        root = Path(tmp)
        cluster = Cluster(root / "cluster")
        cluster.root.mkdir(parents=True)
        profile = os.environ.get("WHIMBREL_BENCH_PROFILE")
        if profile:
            hook = root / "hook"
            hook.mkdir()
            var = "WHIMBREL_BENCH_PROFILE"
            (hook / "sitecustomize.py").write_text(_PROFILE_HOOK.format(var=var))
            path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
            cluster.env = {"PYTHONPATH": path, var: str(Path(profile).resolve())}
        files = {i: cluster.identity("host", _host_id(i)).files for i in range(streams)}
        cluster.start_coordinator()
        try:
            hosts = [Host(i, files[i], cluster.address, _batches(i)) for i in range(streams)]
            result = asyncio.run(_measure(cluster, hosts))
        finally:
            cluster.teardown()
        baseline = _baseline(root, hosts)
    rate = result["events"] / result["seconds"]
    print(
        f"  {streams} streams (TLS): {result['events']} events acknowledged in "
        f"{result['seconds']:.2f}s: {rate:,.0f}/s; coordinator CPU {result['cpu_s']:.2f}s "
        f"(main thread {result['main_thread_cpu_s']:.2f}s), the clients' "
        f"{result['clients_cpu_s']:.2f}s; ack p50 {result['p50_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms; the log alone {baseline:,.0f}/s",
        file=sys.stderr,
    )
    return {
        "value": round(rate),
        "unit": "events/s",
        "baseline": round(baseline),
        "ratio": round(baseline / rate, 2),
        "target": TARGET,
        "met": rate >= TARGET,
        "samples": result["events"],
        "tls": cluster.tls,
        "coordinator_cpu_s": round(result["cpu_s"], 2),
        "coordinator_main_thread_cpu_s": round(result["main_thread_cpu_s"], 2),
        "clients_cpu_s": round(result["clients_cpu_s"], 2),
        "ack_latency_ms": {"p50": round(result["p50_ms"], 1), "p99": round(result["p99_ms"], 1)},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench()))
