"""The whimbrel-coordinator process: health and reflection on a fresh log, a new epoch on every
start, exit 0 on SIGTERM, and exit 2 with nothing logged when it cannot listen."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.log import SqliteEventStore
from tools.cluster import BIN, Process, spawn
from whimbrel.v1 import common_pb2, vm_pb2, vm_pb2_grpc

SERVICES = {
    "whimbrel.v1.MigrationService",
    "whimbrel.v1.VmService",
    "whimbrel.v1.HostService",
    "whimbrel.v1.EventLogService",
}


def start(tmp_path: Path, db: Path) -> tuple[Process, str]:
    args = [str(BIN / "whimbrel-coordinator"), "--db", str(db), "--listen", "127.0.0.1:0"]
    process = spawn("coordinator", args, tmp_path / "c.log", pipe_stdout=True)
    assert process.popen.stdout is not None
    line = process.popen.stdout.readline().decode()
    assert "listening on port" in line, line
    return process, f"127.0.0.1:{line.split()[-1]}"


def test_coordinator_serves_health_and_reflection_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """Health SERVING and whimbrel.v1 in reflection; SIGTERM exits 0; each start a new epoch."""
    db = tmp_path / "whimbrel.db"
    for expected_epoch in (1, 2):
        process, address = start(tmp_path, db)
        try:
            with grpc.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest()).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                reply = next(stub.ServerReflectionInfo(iter([request])))
                assert {s.name for s in reply.list_services_response.service} >= SERVICES
        finally:
            assert process.stop(signal.SIGTERM) == 0
        store = SqliteEventStore(db)
        started = [e.epoch for e in store.read() if e.type == "CoordinatorStarted"]
        store.close()
        assert started == list(range(1, expected_epoch + 1))


def test_unusable_listen_address_exits_2_and_logs_nothing(tmp_path: Path) -> None:
    """A port already taken on loopback is reported, exits 2, and takes no epoch; a port out
    of range is a usage error."""
    db = tmp_path / "w.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        args = [str(BIN / "whimbrel-coordinator"), "--db", str(db), "--listen", address]
        result = subprocess.run(args, capture_output=True, timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert b"cannot listen" in result.stderr
    store = SqliteEventStore(db)
    assert list(store.read()) == []
    store.close()
    args[-1] = "127.0.0.1:99999"
    result = subprocess.run(args, capture_output=True, timeout=30, check=False)
    assert result.returncode == 2 and b"port in 0..65535" in result.stderr


def test_second_coordinator_on_the_same_log_fences_the_first(tmp_path: Path) -> None:
    """A newer coordinator takes a higher epoch; the older one's next write is refused
    (UNAVAILABLE, nothing appended) and it stops itself with exit 3."""
    db = tmp_path / "whimbrel.db"
    first, first_address = start(tmp_path, db)
    second, second_address = start(tmp_path, db)
    try:
        spec = common_pb2.VmSpec(name="vm-1", memory_mib=64, vcpus=1)
        with grpc.insecure_channel(first_address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                vm_pb2_grpc.VmServiceStub(channel).DefineVm(vm_pb2.DefineVmRequest(spec=spec))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "epoch 1 is stale" in err.value.details()
        assert first.popen.wait(10) == 3
        with grpc.insecure_channel(second_address) as channel:
            vm = vm_pb2_grpc.VmServiceStub(channel).DefineVm(vm_pb2.DefineVmRequest(spec=spec))
            assert vm.spec.name == "vm-1"
    finally:
        first.stop()
        assert second.stop() == 0
    store = SqliteEventStore(db)
    epochs = [(e.type, e.epoch) for e in store.read()]
    store.close()
    assert epochs == [("CoordinatorStarted", 1), ("CoordinatorStarted", 2), ("VmDefined", 2)]
