"""A Hypothesis fuzz of every RPC over real gRPC against a real coordinator: hostile and mutated
requests, from any principal, end in OK or a clear refusal, never INTERNAL, UNKNOWN or a hang;
a refused call records nothing; afterwards the log verifies and the invariant checker is clean.

The RPCs are read from the service descriptors of `whimbrel.v1`, so a new one is fuzzed without
a change here; only `HostService.Connect` (a bidirectional stream with its own tests) is left out.
Requests are built from each message's descriptor (hostile strings, integers at the extremes,
unknown enum numbers, nested messages), or half the time are valid ones with a field or two made
hostile, naming what exists (`vm-1` migrating from host-a to host-b as `m-1`, `vm-2` running on
host-b, `vm-3` stopped) so that calls reach the code behind validation. Calls are made as admin
mostly, and as operator, viewer and a user with no role.

Hypothesis runs in a worker thread and sends each call to the test's event loop, where the
channel and the coordinator live, so it keeps its shrinking and its example database.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import whimbrel.v1
from coordinator import codec
from coordinator.core.invariants import InvariantChecker
from coordinator.limits import Limits
from tests.integration.conftest import Running, SimHostd, wait_until
from tools.audit.checks import verify
from tools.sim import SimHosts
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

C = grpc.StatusCode
FD = FieldDescriptor
# Examples per service, each of one to three calls: sized so the file stays within a minute on
# a small CI machine. WHIMBREL_FUZZ_EXAMPLES asks for a longer search.
EXAMPLES = int(os.environ.get("WHIMBREL_FUZZ_EXAMPLES", "200"))
# Only `Connect` streams from the client, and it has its own tests (tests/*/test_host_stream.py).
SKIPPED = {"whimbrel.v1.HostService.Connect"}
# Refusals a client can act on. UNAVAILABLE is not one here: both hosts stay connected and the
# store is healthy, so it would mean the coordinator lost its footing. RESOURCE_EXHAUSTED is
# one only for a request beyond the server's size limit: gRPC also answers it when the status
# details are too large for the client's metadata limit, and then the reason is lost.
REFUSALS = {
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.ALREADY_EXISTS,
    C.PERMISSION_DENIED,
    C.OUT_OF_RANGE,
}
# A refusal's reason well within the 8 KiB of metadata a gRPC client accepts by default.
MAX_DETAILS = 1024
# A server stream is read for at most this many messages or this long, then cut by the client.
STREAM_MESSAGES = 3
STREAM_S = 0.3
UNARY_S = 15.0


def _services() -> list[ServiceDescriptor]:
    found: dict[str, ServiceDescriptor] = {}
    for info in pkgutil.iter_modules(whimbrel.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"whimbrel.v1.{info.name}")
            found.update(module.DESCRIPTOR.services_by_name)
    return [found[name] for name in sorted(found)]


SERVICES = _services()

# --- requests ------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "",
    " ",
    ".",
    "..",
    "../../etc/passwd",
    "vm-1/../vm-2",
    "/etc/shadow",
    "/dev/sda",
    "/var/lib/whimbrel/d.img,file.locking=off",
    "exec:sh -c 'id'",
    "tcp:10.0.0.1:4444",
    "vm-1\n",
    "vm-1\x00",
    "\x00",
    "VM-1",
    "ｖｍ-1",  # noqa: RUF001 - full-width letters, a name that only looks valid
    "vm\u202e1",
    "-",
    "-rf",
    "a" * 64,
    "a" * 65,
    "x" * 70_000,
    "%s%n%x",
    "' OR 1=1 --",
    "migration/",
    "migration/../x",
    "vm/",
    "host/host-a/x",
]
# Names that pass validation: of what exists, and new ones (so that defines succeed).
EXISTING = st.sampled_from(["vm-1", "vm-2", "vm-3"])
NAMES = st.one_of(EXISTING, st.uuids().map(lambda u: f"vm-{u.hex[:8]}"))
# m-1 exists; m-2 and m-3 are what StartMigration seeds ask for, so aborts and switches meet
# the migrations the fuzz started.
OUR_MIGRATIONS = st.sampled_from(["m-2", "m-3"])
MIGRATION_IDS = st.one_of(
    st.just("m-1"), OUR_MIGRATIONS, st.uuids().map(lambda u: f"m-{u.hex[:8]}")
)
HOSTS = st.sampled_from(["host-a", "host-b"])
# Values that pass validation, by field name, so calls reach what lies behind it.
VALID_STRINGS: dict[str, st.SearchStrategy[str]] = {
    "name": NAMES,
    "vm": NAMES,
    "host": HOSTS,
    "destination": HOSTS,
    "migration_id": MIGRATION_IDS,
    "stream": st.sampled_from(["coordinator", "vm/vm-1", "host/host-a", "migration/m-1"]),
    "path": st.sampled_from(["/var/lib/whimbrel/d.img"]),
    "kernel": st.sampled_from(["/boot/vmlinuz"]),
    "initrd": st.sampled_from(["/boot/initrd"]),
    "format": st.sampled_from(["raw", "qcow2"]),
    "interface": st.sampled_from(["", "ide", "virtio"]),
    "machine": st.sampled_from(["pc", "q35"]),
    "mac": st.sampled_from(["52:54:00:12:34:56", "52:54:00:12:34:57"]),
    "model": st.sampled_from(["virtio-net-pci", "e1000"]),
    "bridge": st.sampled_from(["br0"]),
    "tap": st.sampled_from(["tap0"]),
    "kind": st.sampled_from(["ram", "file"]),
    "reason": st.sampled_from(["fuzz"]),
    "expect_head_hash": st.sampled_from(["00" * 32]),
}
INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = sorted({low, low + 1, -1, 0, 1, 2, 16, 100, 2001, 2**31 - 1, 2**32 - 1, high - 1, high})
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]),
        st.integers(max(low, -1000), min(high, 1000)),
        st.integers(low, high),
    )


def _strings(name: str) -> st.SearchStrategy[str]:
    return st.one_of(
        VALID_STRINGS.get(name, st.sampled_from(["vm-1", "host-a", "m-1"])),
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=80),
    )


def _value(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.type in INT_RANGES:
        return _ints(*INT_RANGES[fd.type])
    if fd.type == FD.TYPE_STRING:
        return _strings(fd.name)
    if fd.type == FD.TYPE_BYTES:
        return st.binary(max_size=80)
    if fd.type == FD.TYPE_BOOL:
        return st.booleans()
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(width=32 if fd.type == FD.TYPE_FLOAT else 64)
    if fd.enum_type is not None:
        known = [v.number for v in fd.enum_type.values]
        # Enums of proto3 are open: any int32 arrives, named or not.
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))
    if fd.message_type is not None:
        return messages(fd.message_type, depth + 1)
    raise AssertionError(f"no strategy for {fd.full_name} of type {fd.type}")


def _set(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    """Set field `fd` of `msg` to `value`; a repeated field gains the items of `value`."""
    if fd.is_repeated:
        target = getattr(msg, fd.name)
        if fd.type == FD.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif fd.type == FD.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def _fill(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        _set(msg, cls.DESCRIPTOR.fields_by_name[name], value)
    return msg


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `desc` with any subset of their fields set to hostile or valid values."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue  # no map fields in the API; a new one is fuzzed empty
        value = _value(fd, depth)
        optional[fd.name] = st.lists(value, max_size=4) if fd.is_repeated else value
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _fill(cls, values))


def _spec(name: str) -> common_pb2.VmSpec:
    spec = common_pb2.VmSpec(name=name, memory_mib=64, vcpus=2, machine="q35")
    spec.disks.add(path=f"/var/lib/whimbrel/{name}.img", format="qcow2", interface="virtio")
    spec.nics.add(mac="52:54:00:12:34:56", bridge="br0", model="virtio-net-pci")
    return spec


# Well-formed requests, by request type, that a fuzzed request starts from half the time.
SEEDS: dict[str, st.SearchStrategy[Message]] = {
    vm_pb2.DefineVmRequest.DESCRIPTOR.full_name: st.builds(
        vm_pb2.DefineVmRequest, spec=st.uuids().map(lambda u: _spec(f"vm-{u.hex[:8]}"))
    ),
    vm_pb2.StartVmRequest.DESCRIPTOR.full_name: st.builds(
        vm_pb2.StartVmRequest, name=EXISTING, host=HOSTS
    ),
    vm_pb2.StopVmRequest.DESCRIPTOR.full_name: st.builds(
        vm_pb2.StopVmRequest, name=EXISTING, force=st.booleans()
    ),
    migration_pb2.StartMigrationRequest.DESCRIPTOR.full_name: st.builds(
        migration_pb2.StartMigrationRequest,
        vm=EXISTING,
        destination=HOSTS,
        mode=st.sampled_from(list(common_pb2.MigrationMode.values())),
        policy=st.just(events_pb2.MigrationPolicy(auto_postcopy_min_passes=2)),
        migration_id=st.one_of(st.just(""), OUR_MIGRATIONS),
    ),
    migration_pb2.AbortMigrationRequest.DESCRIPTOR.full_name: st.builds(
        migration_pb2.AbortMigrationRequest, migration_id=MIGRATION_IDS, reason=st.just("fuzz")
    ),
    migration_pb2.SwitchToPostcopyRequest.DESCRIPTOR.full_name: st.builds(
        migration_pb2.SwitchToPostcopyRequest, migration_id=MIGRATION_IDS
    ),
}


@st.composite
def _mutated(draw: st.DrawFn, seed: Message) -> Message:
    """`seed` with one field, at any depth, set to a drawn value (a list gains an item)."""
    target = seed
    while True:
        fd = draw(st.sampled_from(list(target.DESCRIPTOR.fields)))
        nested = fd.type == FD.TYPE_MESSAGE and not fd.is_repeated
        if not (nested and draw(st.booleans())):
            break
        target = getattr(target, fd.name)
    value = draw(_value(fd, 0))
    _set(target, fd, [value] if fd.is_repeated else value)
    return seed


@st.composite
def requests(draw: st.DrawFn, method: MethodDescriptor) -> Message:
    """A random request, or half the time a valid one with one or two fields made hostile
    (or none: then it should succeed, and later calls meet the state it made)."""
    seeds = SEEDS.get(method.input_type.full_name)
    if seeds is None or draw(st.booleans()):
        return draw(messages(method.input_type))
    request = draw(seeds)
    for _ in range(draw(st.integers(0, 2))):
        request = draw(_mutated(request))
    return request


# Mostly admin, who may call everything, so calls get past authorization.
PRINCIPALS = ["admin"] * 5 + ["operator", "viewer", "nobody"]


# --- calls ---------------------------------------------------------------------------------


@dataclass
class Tally:
    calls: int = 0
    codes: collections.Counter[str] = field(default_factory=collections.Counter)


async def _call(
    running: Running, principal: str, method: MethodDescriptor, request: Message
) -> grpc.StatusCode:
    """Make one call and check the property; returns its status."""
    channel = running.channel if principal == "admin" else running.channel_as("user", principal)
    path = f"/{method.containing_service.full_name}/{method.name}"
    reply = message_factory.GetMessageClass(method.output_type)
    before = running.app.store.head()[0]
    code, details = C.OK, ""
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=reply.FromString,
            )(request, timeout=STREAM_S)
            read = 0
            async for _ in stream:
                read += 1
                if read >= STREAM_MESSAGES:
                    stream.cancel()
                    break
        else:
            await channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=reply.FromString,
            )(request, timeout=UNARY_S)
    except grpc.aio.AioRpcError as err:
        code, details = err.code(), err.details() or ""
    assert not running.app.stop_reason, running.app.stop_reason
    if code == C.OK:
        return code
    cut = method.server_streaming and code == C.DEADLINE_EXCEEDED
    oversize = code == C.RESOURCE_EXHAUSTED and request.ByteSize() > Limits().max_receive_bytes
    assert code in REFUSALS or cut or oversize, f"{path} answered {code.name}: {details[:200]}"
    assert cut or details, f"{path} refused with {code.name} and no reason"
    assert len(details) <= MAX_DETAILS, f"{path} refused with {len(details)} characters of reason"
    # Hosts keep reporting and the clock keeps deciding while a call is served, so the log may
    # grow during a refused call; what it must not hold is anything a request asked for.
    for stored in running.app.store.read(from_seq=before + 1):
        event = codec.from_stored(stored)
        requested_by = getattr(event.payload, "requested_by", "")
        assert not requested_by, f"{path} refused with {code.name} yet logged {event}"
    return code


def _fuzz(
    running: Running,
    loop: asyncio.AbstractEventLoop,
    service: ServiceDescriptor,
    tally: Tally,
) -> None:
    """Run Hypothesis in this (worker) thread, each call on `loop`, the coordinator's."""
    methods = {m.name: m for m in service.methods if m.full_name not in SKIPPED}
    names = sorted(methods)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="calls")):
            method = methods[data.draw(st.sampled_from(names), label="method")]
            principal = data.draw(st.sampled_from(PRINCIPALS), label="principal")
            request = data.draw(requests(method), label="request")
            call = _call(running, principal, method, request)
            code = asyncio.run_coroutine_threadsafe(call, loop).result(UNARY_S + 15)
            tally.calls += 1
            tally.codes[f"{method.name}:{code.name}"] += 1

    if methods:
        run()


async def _world(running: Running, sim_hosts: SimHosts) -> list[SimHostd]:
    """vm-1 on host-a migrating to host-b as `m-1`, vm-2 running on host-b, vm-3 stopped."""
    hosts = [SimHostd(h, running.channel, sim_hosts) for h in ("host-a", "host-b")]
    for host in hosts:
        await host.start()
    vms = vm_pb2_grpc.VmServiceStub(running.channel)
    for name, host_id in (("vm-1", "host-a"), ("vm-2", "host-b"), ("vm-3", "")):
        await vms.DefineVm(vm_pb2.DefineVmRequest(spec=_spec(name)))
        if host_id:
            await vms.StartVm(vm_pb2.StartVmRequest(name=name, host=host_id))
    world = running.app.world
    await wait_until(
        lambda: world.vms["vm-1"].status == world.vms["vm-2"].status == 3, running.app, *hosts
    )
    await migration_pb2_grpc.MigrationServiceStub(running.channel).StartMigration(
        migration_pb2.StartMigrationRequest(vm="vm-1", destination="host-b", migration_id="m-1")
    )
    return hosts


@pytest.mark.parametrize("service", SERVICES, ids=[s.name for s in SERVICES])
async def test_every_rpc_refuses_hostile_requests_cleanly(
    coordinator: Running, sim_hosts: SimHosts, service: ServiceDescriptor
) -> None:
    """Random and mutated requests to each RPC of `service` end in OK or a clear refusal that
    logs nothing; the coordinator keeps serving, its log verifies and keeps invariants."""
    hosts = await _world(coordinator, sim_hosts)
    loop = asyncio.get_running_loop()
    tally = Tally()
    started = loop.time()
    await asyncio.to_thread(_fuzz, coordinator, loop, service, tally)
    elapsed = loop.time() - started
    print(f"{service.name}: {tally.calls} calls in {elapsed:.1f}s: {sorted(tally.codes.items())}")

    app = coordinator.app
    assert not app.stop_reason
    assert all(h.error is None for h in hosts)
    report = await asyncio.to_thread(verify, app.store.path)
    assert report.ok, report.findings
    events = [codec.from_stored(s) for s in app.store.read()]
    assert InvariantChecker().check(events) == []
    for host in hosts:
        await host.stop()


# --- what the fuzz found ---------------------------------------------------------------------


async def test_read_events_from_beyond_any_seq_is_invalid_argument(coordinator: Running) -> None:
    """ReadEvents from a seq no log can hold (past 2^63-1) is refused, where the store failed
    with UNKNOWN (found by the fuzz: from_seq 18446744073709551614)."""
    log = eventlog_pb2_grpc.EventLogServiceStub(coordinator.channel)
    for follow in (False, True):
        request = eventlog_pb2.ReadEventsRequest(from_seq=2**64 - 2, follow=follow)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await log.ReadEvents(request).read()
        assert refused.value.code() == C.INVALID_ARGUMENT, refused.value
    last = eventlog_pb2.ReadEventsRequest(from_seq=2**63 - 1)
    assert [e async for e in log.ReadEvents(last)] == []


HUGE = "x" * 70_000
HUGE_REQUESTS: list[tuple[str, Message]] = [
    ("/whimbrel.v1.VmService/GetVm", vm_pb2.GetVmRequest(name=HUGE)),
    ("/whimbrel.v1.VmService/StopVm", vm_pb2.StopVmRequest(name=HUGE)),
    ("/whimbrel.v1.VmService/DefineVm", vm_pb2.DefineVmRequest(spec=common_pb2.VmSpec(name=HUGE))),
    (
        "/whimbrel.v1.VmService/DefineVm",
        vm_pb2.DefineVmRequest(
            spec=common_pb2.VmSpec(
                name="vm-9", memory_mib=64, vcpus=1, disks=[common_pb2.Disk(path=HUGE)]
            )
        ),
    ),
    (
        "/whimbrel.v1.MigrationService/SwitchToPostcopy",
        migration_pb2.SwitchToPostcopyRequest(migration_id=HUGE),
    ),
    ("/whimbrel.v1.EventLogService/ReadEvents", eventlog_pb2.ReadEventsRequest(stream=HUGE)),
    (
        "/whimbrel.v1.EventLogService/ReadEvents",
        eventlog_pb2.ReadEventsRequest(stream="vm/" + HUGE),
    ),
]


@pytest.mark.parametrize(
    ("path", "request_"), HUGE_REQUESTS, ids=[p.rsplit("/")[-1] for p, _ in HUGE_REQUESTS]
)
async def test_a_refused_huge_value_is_quoted_cut_short(
    coordinator: Running, path: str, request_: Message
) -> None:
    """A 70,000-character name, id, path or stream is refused with INVALID_ARGUMENT and a short
    reason: quoted whole, the reason exceeded the client's metadata limit, and the client got
    RESOURCE_EXHAUSTED without it (found by the fuzz, e.g. StopVm{name: "x" * 70000})."""
    serialize = type(request_).SerializeToString
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        if path.endswith("/ReadEvents"):
            await coordinator.channel.unary_stream(path, serialize)(request_).read()
        else:
            await coordinator.channel.unary_unary(path, serialize)(request_)
    assert refused.value.code() == C.INVALID_ARGUMENT, refused.value
    details = refused.value.details() or ""
    assert "'xxxxxxxx" in details and "(70000 characters)" in details
    assert len(details) <= MAX_DETAILS
