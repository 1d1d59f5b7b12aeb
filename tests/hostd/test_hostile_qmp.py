"""A QEMU speaking hostile QMP (garbage, a message beyond the reader's limit, a socket closed in
the middle of a command, malformed events) never crashes hostd: the VM's QEMU is reported
broken (QMP unreachable while the process lives), stays tracked by its pid, and a destroy
still kills it. The "QEMU" is a real process; its QMP peer is a fake on the real socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf.message import Message

from hostd import vm as vm_module
from hostd.errors import HostdError, QmpError, QmpUnavailable
from hostd.event_budget import BURST, DROPPED_EVENT
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}  # fmt: skip


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


async def request(reader: asyncio.StreamReader) -> dict[str, object]:
    """The next command the client sent (QMP clients need not end one with a newline)."""
    buffer = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("client went away")
        buffer += chunk
        with contextlib.suppress(ValueError):
            message, _ = json.JSONDecoder().raw_decode(buffer.decode())
            return dict(message)


async def hostile_peer(
    mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Speaks QMP correctly up to the capabilities negotiation, then misbehaves per `mode`."""
    try:
        await _misbehave(mode, reader, writer)
    except ConnectionError:
        pass  # the client gave up on us: what it should do
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _misbehave(mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if mode == "garbage-greeting":
        writer.write(b"\x00\xffthis is not QMP\n")
        await writer.drain()
        await reader.read()
        return
    writer.write(line(GREETING))
    negotiation = await request(reader)
    writer.write(line({"return": {}, "id": negotiation.get("id")}))
    if mode in _POLITE:
        await _POLITE[mode](reader, writer)
        return
    if mode == "malformed-events":
        for event in ({"event": "STOP", "timestamp": "soon"}, {"event": "MIGRATION", "data": [1]},
                      {"event": "RESUME", "timestamp": {"seconds": "x"}}):  # fmt: skip
            writer.write(line(event))
    await writer.drain()
    await request(reader)  # the first command after negotiation
    if mode == "garbage":
        writer.write(b"{not json at all\n")
    elif mode == "huge":
        writer.write(b'{"return": "' + b"x" * (11 * 1024 * 1024) + b'", "id": null}\n')
    elif mode == "malformed-events":
        writer.write(b'["an", "array"]\n')
    # "closed": the socket closes in the middle of the command.
    await writer.drain()


async def _answers_arrays(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Well-formed QMP whose answers are arrays where QEMU always gives objects."""
    while True:
        command = await request(reader)
        writer.write(line({"return": [], "id": command.get("id")}))
        await writer.drain()


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A QEMU whose main thread is stuck: the socket stays open, nothing is answered."""
    await reader.read()


def _event(name: str, data: object) -> bytes:
    return line({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}})


Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _answers_then_sends(*events: bytes) -> Peer:
    """A QEMU that answers every command and, after the first, sends `events` at once."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = False
        while True:
            command = await request(reader)
            writer.write(line({"return": {}, "id": command.get("id")}))
            if not sent:
                writer.writelines(events)
                sent = True
            await writer.drain()

    return peer


# A guest resetting itself in a loop: this many RESETs at once, then a STOP.
FLOOD = 300

_POLITE: dict[str, Peer] = {
    "arrays": _answers_arrays,
    "silent": _never_answers,
    # A pass numbered "x" (the handler cannot take it), a 100 kB event, then a plain STOP.
    "odd-events": _answers_then_sends(
        _event("MIGRATION", {"status": "active"}),
        _event("MIGRATION_PASS", {"pass": "x"}),
        _event("BLOCK_JOB_ERROR", {"device": "d" * 100_000}),
        _event("STOP", {}),
    ),
    "reset-flood": _answers_then_sends(
        *[_event("RESET", {"guest": True, "reason": "guest-reset"})] * FLOOD,
        _event("STOP", {}),
    ),
    "goes-active": _answers_then_sends(_event("MIGRATION", {"status": "active"})),
}


class Reported:
    def __init__(self) -> None:
        self.payloads: list[Message] = []
        self.broken = asyncio.Event()
        self.drops_reported = asyncio.Event()
        self.stopped = asyncio.Event()
        self.active = asyncio.Event()

    async def emit(self, payload: Message, time_us: int) -> None:
        self.payloads.append(payload)
        if isinstance(payload, events_pb2.VmObserved) and payload.reason == "qmp-broken":
            self.broken.set()
        if isinstance(payload, events_pb2.QmpEventReceived) and payload.event == DROPPED_EVENT:
            self.drops_reported.set()
        if isinstance(payload, events_pb2.QmpEventReceived) and payload.event == "STOP":
            self.stopped.set()
        if isinstance(payload, events_pb2.QmpEventReceived) and '"active"' in payload.data_json:
            self.active.set()

    def observed(self) -> list[tuple[str, bool, bool]]:
        return [
            (p.reason, p.observation.process_alive, p.observation.qmp_reachable)
            for p in self.payloads
            if isinstance(p, events_pb2.VmObserved)
        ]


@pytest.fixture
async def process() -> AsyncIterator[asyncio.subprocess.Process]:
    """A real process standing in for QEMU."""
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@contextlib.asynccontextmanager
async def served(tmp_path: Path, mode: str, reported: Reported) -> AsyncIterator[VmRuntime]:
    """A VM runtime, not yet attached, whose QMP socket a `hostile_peer(mode)` serves."""
    runtime = VmRuntime(common_pb2.VmSpec(name="vm-1"), tmp_path / "vm", reported.emit)
    runtime.paths.root.mkdir()
    server = await asyncio.start_unix_server(
        lambda r, w: hostile_peer(mode, r, w), path=str(runtime.paths.qmp)
    )
    try:
        yield runtime
    finally:
        server.close()
        await runtime.close()


@pytest.mark.parametrize("mode", ["garbage", "huge", "closed", "malformed-events"])
async def test_hostile_qmp_reports_the_qemu_broken_and_destroy_still_kills_it(
    tmp_path: Path, process: asyncio.subprocess.Process, mode: str
) -> None:
    reported = Reported()
    async with attached(tmp_path, process, mode, reported) as runtime:
        await asyncio.wait_for(reported.broken.wait(), 10)
        # The attach's own observation may come after the break it ran into: both say so.
        observed = reported.observed()
        assert ("qmp-broken", True, False) in observed and observed[-1][1:] == (True, False)
        with pytest.raises(HostdError):
            await runtime.execute("query-status")
        assert not runtime.exited.is_set()
        await runtime.kill("destroyed")
        assert process.returncode is not None or await process.wait() == -9
        exits = [p for p in reported.payloads if isinstance(p, events_pb2.QemuExited)]
        assert [(e.pid, e.signal) for e in exits] == [(process.pid, 9)]


async def test_a_garbage_greeting_fails_attach_and_leaves_the_process_tracked(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """Attach fails with QmpUnavailable; the process is still watched and killable."""
    reported = Reported()
    async with served(tmp_path, "garbage-greeting", reported) as runtime:
        with pytest.raises(QmpUnavailable):
            await runtime.attach(process.pid)
        await runtime.kill("destroyed")
        assert await process.wait() == -9 and runtime.exited.is_set()


async def test_a_qemu_that_goes_away_is_no_error_in_hostd_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed QEMU's socket resets under qemu.qmp's reader, which logs that as an ERROR;
    hostd reports the exit itself, so the operator's log shows no ERROR for it."""
    from hostd.qmp import QmpSession

    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(line(GREETING))
        negotiation = await request(reader)
        writer.write(line({"return": {}, "id": negotiation.get("id")}))
        await writer.drain()
        # Like a killed QEMU: the client's next command stays unread in the socket, so the
        # close resets the connection under the client's reader.
        writer.transport.pause_reading()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(dies, path=str(path))
    session = QmpSession("vm-1", str(path))

    async def sink(name: str, data: dict[str, object], time_us: int) -> None:
        return None

    with caplog.at_level("INFO"):
        await session.connect(sink)
        with pytest.raises(QmpUnavailable):
            await session.execute("query-status")
        await session.close()
    server.close()
    errors = [r for r in caplog.records if r.levelno >= 40 and r.name.startswith("qemu.qmp")]
    assert errors == []


@contextlib.asynccontextmanager
async def attached(
    tmp_path: Path, process: asyncio.subprocess.Process, mode: str, reported: Reported
) -> AsyncIterator[VmRuntime]:
    async with served(tmp_path, mode, reported) as runtime:
        await runtime.attach(process.pid)
        yield runtime


async def test_an_answer_that_is_not_an_object_is_qemus_error_not_a_crash(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """query-status answered with an array crashed the snapshot (AttributeError), and with it
    hostd's reattach and every hello: the whole host went dark. Now it is a QMP error of this
    VM: the snapshot says QMP unreachable."""
    reported = Reported()
    async with attached(tmp_path, process, "arrays", reported) as runtime:
        with pytest.raises(QmpError, match="answered list, not an object"):
            await runtime.query("query-migrate")
        observation = await runtime.snapshot()
        assert observation.process_alive and not observation.qmp_reachable


async def test_a_qemu_that_never_answers_gives_a_snapshot_within_its_limit(
    tmp_path: Path, process: asyncio.subprocess.Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QEMU whose main thread is stuck held hostd's hello for good (the snapshots were taken
    one by one, unbounded). Each is bounded now: QMP unreachable after the limit."""
    monkeypatch.setattr(vm_module, "SNAPSHOT_LIMIT_S", 0.2)
    reported = Reported()
    async with attached(tmp_path, process, "silent", reported) as runtime:
        observation = await asyncio.wait_for(runtime.snapshot(), 5)
        assert observation.process_alive and not observation.qmp_reachable


async def test_an_event_the_handler_fails_on_leaves_later_events_flowing(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """One event hostd could not handle ended the VM's event forwarding for good: a later STOP
    (or SHUTDOWN) never reached the coordinator. And a 100 kB event is logged without its data,
    which would otherwise fill the outbox and the log."""
    reported = Reported()
    async with attached(tmp_path, process, "odd-events", reported) as runtime:
        runtime.role = "source"

        def events() -> list[events_pb2.QmpEventReceived]:
            return [p for p in reported.payloads if isinstance(p, events_pb2.QmpEventReceived)]

        for _ in range(500):
            if any(e.event == "STOP" for e in events()):
                break
            await asyncio.sleep(0.01)
        names = [e.event for e in events()]
        assert names == ["MIGRATION", "MIGRATION_PASS", "BLOCK_JOB_ERROR", "STOP"], names
        huge = events()[2]
        assert json.loads(huge.data_json) == {
            "whimbrel_dropped_bytes": len(json.dumps({"device": "d" * 100_000}))
        }


async def test_a_guest_resetting_in_a_loop_is_kept_off_the_log_beyond_a_budget(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """A guest can have QEMU send a RESET every few tens of milliseconds (48 in 3 s under TCG
    from a boot sector that resets at once), each one appended to the coordinator's durable
    log, forever. A burst of them goes up, the rest are counted and reported as one event;
    the events hostd and the coordinator act on (the STOP after them) always go up."""
    reported = Reported()
    async with attached(tmp_path, process, "reset-flood", reported):
        await asyncio.wait_for(reported.drops_reported.wait(), 10)
    events = [p for p in reported.payloads if isinstance(p, events_pb2.QmpEventReceived)]
    names = [e.event for e in events]
    resets = names.count("RESET")
    assert BURST <= resets < BURST + 5, resets
    assert "STOP" in names
    (report,) = [e for e in events if e.event == DROPPED_EVENT]
    assert json.loads(report.data_json)["dropped"] == {"RESET": FLOOD - resets}


async def test_drops_are_reported_before_the_exit_that_ends_the_vm_here(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """QEMU ends within the report's period (a stop, a destroy, the guest's power-off): the
    count goes up before QemuExited, not after it, when this host's part may be over (a
    report after it was refused and locked the host out; review of 74d7c2a)."""
    reported = Reported()
    async with attached(tmp_path, process, "reset-flood", reported) as runtime:
        await asyncio.wait_for(reported.stopped.wait(), 10)
        await runtime.kill("destroyed")
    kinds = [
        p.event if isinstance(p, events_pb2.QmpEventReceived) else type(p).__name__
        for p in reported.payloads
        if isinstance(p, events_pb2.QmpEventReceived | events_pb2.QemuExited)
    ]
    assert kinds[-2:] == [DROPPED_EVENT, "QemuExited"], kinds[-3:]
    assert kinds.count(DROPPED_EVENT) == 1


async def test_a_pre_copy_source_connection_gets_nodelay_once_active(tmp_path: Path) -> None:
    """START_MIGRATION names where the source connects (runtime.nodelay_for); when its QEMU
    reports the migration active, hostd sets TCP_NODELAY on that connection of the QEMU
    process (hostd.migration_socket). Here the QEMU is a child process connected to a local
    listener, which reports its socket's setting."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", NODELAY_REPORTER, str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert await child.stdout.readline() == b"connected\n"
        peer, _ = listener.accept()
        reported = Reported()
        async with served(tmp_path, "goes-active", reported) as runtime:
            runtime.nodelay_for = f"tcp:127.0.0.1:{port}"
            await runtime.attach(child.pid)
            await asyncio.wait_for(reported.active.wait(), 10)
            # The option is set beside the event stream, by the time the event went up.
            await asyncio.gather(*runtime._beside_tasks)
            assert runtime.nodelay_for == ""
        child.stdin.write(b"?\n")
        assert await child.stdout.readline() == b"1\n"
        peer.close()
    finally:
        listener.close()
        child.kill()
        await child.wait()


NODELAY_REPORTER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
for _ in sys.stdin:
    print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
"""
