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
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf.message import Message

from hostd import qmp as qmp_module
from hostd import vm as vm_module
from hostd.errors import HostdError, QmpError, QmpUnavailable
from hostd.event_budget import ACTED_ON_BURST, BURST, DROPPED_EVENT
from hostd.qmp import QmpSession, event_time_us
from hostd.vm import VmRuntime
from whimbrel.v1 import common_pb2, events_pb2

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}  # fmt: skip


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


# What a client sent beyond the command last read, per connection: two commands can come in
# one read.
_unread: weakref.WeakKeyDictionary[asyncio.StreamReader, str] = weakref.WeakKeyDictionary()


async def request(reader: asyncio.StreamReader) -> dict[str, object]:
    """The next command the client sent (QMP clients need not end one with a newline)."""
    buffer = _unread.pop(reader, "")
    while True:
        with contextlib.suppress(ValueError):
            message, end = json.JSONDecoder().raw_decode(buffer.lstrip())
            _unread[reader] = buffer.lstrip()[end:]
            return dict(message)
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("client went away")
        buffer += chunk.decode()


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


def _event(name: str, data: object, seconds: object = 1) -> bytes:
    stamp = {"seconds": seconds, "microseconds": 0}
    return line({"event": name, "data": data, "timestamp": stamp})


Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _sends_when_asked(command_name: str, events: list[bytes], answer: object) -> Peer:
    """A QEMU that answers every command with `answer` and sends `events` right after its
    answer to `command_name`."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            command = await request(reader)
            writer.write(line({"return": answer, "id": command.get("id")}))
            if command.get("execute") == command_name:
                writer.writelines(events)
            await writer.drain()

    return peer


def _answers_then_sends(*events: bytes, answer: object = None) -> Peer:
    """A QEMU that answers every command (with `answer`, default {}) and, after the first,
    sends `events` at once."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = False
        while True:
            command = await request(reader)
            writer.write(line({"return": answer or {}, "id": command.get("id")}))
            if not sent:
                writer.writelines(events)
                sent = True
            await writer.drain()

    return peer


# A guest resetting itself in a loop: this many RESETs at once, then a STOP.
FLOOD = 300
STOP_FLOOD = 1000
PASS_FLOOD = 600


def _answers_with(answer: object) -> Peer:
    """A QEMU that answers every command with `answer`."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            command = await request(reader)
            writer.write(line({"return": answer, "id": command.get("id")}))
            await writer.drain()

    return peer


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
    # Stamps no QEMU sends: far in the future, before 1970, beyond SQLite's integers, text.
    "odd-stamps": _answers_then_sends(
        _event("RESUME", {}, 10**11),
        _event("RESUME", {}, -5),
        _event("RESUME", {}, 10**20),
        _event("RESUME", {}, "soon"),
        _event("STOP", {}),
    ),
    # Names no QEMU event has: lower case, a space, 100 characters, then a plain STOP.
    "odd-names": _answers_then_sends(
        _event("stop", {}), _event("RE SET", {}), _event("A" * 100, {}), _event("STOP", {})
    ),
    # A QEMU taken over, sending the events hostd acts on without end.
    "stop-flood": _answers_then_sends(*[_event("STOP", {})] * STOP_FLOOD),
    "long-statuses": _answers_with({"status": "x" * 100_000}),
    # A source whose passes use up the budget of events acted on right before its switchover
    # (its STOP and completed are dropped); asked, QEMU says how it is: stopped, completed.
    "switch-dropped": _sends_when_asked(
        "query-name",
        [_event("MIGRATION_PASS", {"pass": n}) for n in range(PASS_FLOOD)]
        + [_event("STOP", {}), _event("MIGRATION", {"status": "completed"})],
        {"status": "completed"},
    ),
    # A lone surrogate, which JSON carries and protobuf refuses, in a status and an error text.
    "surrogates": _answers_then_sends(
        _event("MIGRATION", {"status": "failed"}),
        _event("STOP", {}),
        answer={"status": "\ud800", "error-desc": "bad \ud800 peer"},
    ),
}


class Reported:
    def __init__(self) -> None:
        self.payloads: list[Message] = []
        # QMP events with the time they went up with.
        self.stamped: list[tuple[int, events_pb2.QmpEventReceived]] = []
        self.broken = asyncio.Event()
        self.drops_reported = asyncio.Event()
        self.stopped = asyncio.Event()
        self.active = asyncio.Event()
        self.read_afresh = asyncio.Event()

    async def emit(self, payload: Message, time_us: int) -> None:
        self.payloads.append(payload)
        if isinstance(payload, events_pb2.QmpEventReceived):
            self.stamped.append((time_us, payload))
        if isinstance(payload, events_pb2.VmObserved) and payload.reason == "qmp-broken":
            self.broken.set()
        if isinstance(payload, events_pb2.VmObserved) and payload.reason == "qmp-events-dropped":
            self.read_afresh.set()
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
        await session.connect(sink, lambda dropped: None)
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


def _qmp_events(reported: Reported) -> list[events_pb2.QmpEventReceived]:
    return [p for p in reported.payloads if isinstance(p, events_pb2.QmpEventReceived)]


@pytest.mark.parametrize("seconds", [10**11, -5, 10**20, "soon", True, 1.5])
def test_a_stamp_no_qemu_sends_gives_way_to_hostds_clock(seconds: object) -> None:
    now_us = 1_800_000_000_000_000
    assert event_time_us(seconds, 0, now_us) == now_us


def test_a_stamp_of_the_last_minutes_is_kept() -> None:
    now_us = 1_800_000_000_000_000
    assert event_time_us(1_800_000_000 - 60, 7, now_us) == now_us - 60_000_000 + 7


async def test_events_with_stamps_no_qemu_sends_go_up_stamped_now(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """A RESUME stamped far in the future had the coordinator refuse the host's stream, again
    at every reconnect (hostd sends it again): every VM of the host was out of reach for good;
    one beyond SQLite's integers could not even be recorded. Such stamps give way to hostd's
    clock."""
    reported = Reported()
    before_us = time.time_ns() // 1000
    async with attached(tmp_path, process, "odd-stamps", reported):
        await asyncio.wait_for(reported.stopped.wait(), 10)
    after_us = time.time_ns() // 1000
    stamps = [time_us for time_us, payload in reported.stamped if payload.event == "RESUME"]
    assert len(stamps) == 4
    assert all(before_us <= t <= after_us for t in stamps), stamps


async def test_events_named_as_no_qemu_event_is_named_are_skipped(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """A name of any length went into the log as it came (3 MB in one event, in a review)."""
    reported = Reported()
    async with attached(tmp_path, process, "odd-names", reported):
        await asyncio.wait_for(reported.stopped.wait(), 10)
    assert [e.event for e in _qmp_events(reported)] == ["STOP"]


async def test_a_flood_of_events_acted_on_is_bounded_and_qemus_state_read_afresh(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """A QEMU taken over sent 500 of 500 STOPs to the log (and any number more). Past their
    budget they are dropped and counted, and the VM's state is read from QEMU and reported
    instead, so what the coordinator acts on stays true."""
    reported = Reported()
    async with attached(tmp_path, process, "stop-flood", reported):
        await asyncio.wait_for(reported.read_afresh.wait(), 10)
        await asyncio.wait_for(reported.drops_reported.wait(), 10)
    events = _qmp_events(reported)
    stops = [e.event for e in events].count("STOP")
    assert ACTED_ON_BURST <= stops < ACTED_ON_BURST + 20, stops
    # Read afresh once the events queued before are handled: the state as QEMU gives it now.
    afresh = [p for p in reported.payloads if isinstance(p, events_pb2.VmObserved)]
    assert afresh[-1].reason == "qmp-events-dropped" and afresh[-1].observation.qmp_reachable
    (report,) = [e for e in _qmp_events(reported) if e.event == DROPPED_EVENT]
    assert json.loads(report.data_json)["dropped"] == {"STOP": STOP_FLOOD - stops}


async def test_events_beyond_the_queue_are_dropped_not_kept_and_then_made_up_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu.qmp kept every event in its listeners' queues and histories, a default listener
    no one reads included: 200,000 events grew hostd from 45 to 320 MB in a review, and a guest
    resetting in a loop grows it slowly all the same. Events now wait in one bounded queue;
    those beyond it while the handler is held up are dropped, and the handler is told how many
    once the queue has drained."""
    monkeypatch.setattr(qmp_module, "MAX_QUEUED_EVENTS", 50)
    sent = 400
    events = [_event("RESET", {"n": n}) for n in range(sent)]
    path = tmp_path / "qmp.sock"
    server = await asyncio.start_unix_server(
        lambda r, w: hostile_peer("flood", r, w), path=str(path)
    )
    _POLITE["flood"] = _answers_then_sends(*events)
    release, told = asyncio.Event(), asyncio.Event()
    handled: list[int] = []
    dropped: list[int] = []

    async def sink(name: str, data: dict[str, object], time_us: int) -> None:
        await release.wait()
        handled.append(int(str(data["n"])))

    def overflow(count: int) -> None:
        dropped.append(count)
        told.set()

    session = QmpSession("vm-1", str(path))
    try:
        await session.connect(sink, overflow)
        await session.execute("query-status")  # after its answer, the peer floods
        # Answered after every event of the flood was read (QMP keeps the order).
        await session.execute("query-status")
        assert not told.is_set()  # not while events are still queued
        release.set()
        await asyncio.wait_for(told.wait(), 10)
        # The queue's 50, and one more if the handler took it before the queue filled up;
        # the newest are the ones dropped, and the handler is told of them all, once.
        assert handled == list(range(len(handled))) and len(handled) in (50, 51)
        assert dropped == [sent - len(handled)]
        # Nothing kept elsewhere: qemu.qmp's default listener saw none of them.
        assert session._client.events.history == () and session._client.events.empty()
    finally:
        del _POLITE["flood"]
        await session.close()
        server.close()


async def test_statuses_longer_than_any_of_qemus_are_reported_empty(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """Statuses went into the snapshot, and with it into every hello, whatever their length:
    5 MB made the hello too large for the coordinator, and the host never connected again."""
    reported = Reported()
    async with attached(tmp_path, process, "long-statuses", reported) as runtime:
        observation = await runtime.snapshot()
    assert observation.qmp_reachable
    assert observation.runstate == "" and observation.migration_status == ""


async def test_a_quit_qemu_never_answers_is_killed_on_time(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """The limit began only after QEMU answered the quit: one that never answered held the
    stop (or destroy) for good, its QEMU alive."""
    reported = Reported()
    async with attached(tmp_path, process, "silent", reported) as runtime:
        await asyncio.wait_for(runtime.quit("stopped", limit=0.3), 5)
        assert await asyncio.wait_for(process.wait(), 5) == -9


async def test_text_protobuf_cannot_carry_is_no_reason_to_lose_a_hello_or_an_event(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """A lone surrogate (JSON carries it, protobuf refuses it) in a status broke the snapshot,
    and with it every hello: the host out of reach for good. In a failure's error text it lost
    the MIGRATION failed event itself."""
    reported = Reported()
    async with attached(tmp_path, process, "surrogates", reported) as runtime:
        await asyncio.wait_for(reported.stopped.wait(), 10)
        observation = await runtime.snapshot()
    assert observation.qmp_reachable and observation.runstate == ""
    statuses = [
        p.status for p in reported.payloads if isinstance(p, events_pb2.MigrationStatsSampled)
    ]
    assert "failed" in statuses
    failed = [p for p in reported.payloads if isinstance(p, events_pb2.MigrationStatsSampled)]
    assert failed[-1].error_desc == "bad ? peer"
    assert [e.event for e in _qmp_events(reported)] == ["MIGRATION", "STOP"]


def test_a_command_failing_with_such_text_is_still_answered() -> None:
    """QEMU's error text goes into the command's answer: with a lone surrogate it could not be
    built, and the command was never answered."""
    from hostd.agent import failed
    from whimbrel.v1 import host_pb2

    command = host_pb2.Command(command_id="c-1", vm="vm-1", kind=events_pb2.COMMAND_KIND_STOP_VM)
    answer = failed(command, "QEMU said: bad \ud800 peer")
    assert answer.command_failed.error == "QEMU said: bad ? peer"


async def test_what_dropped_events_would_have_set_off_follows_the_state_read_afresh(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> None:
    """A source armed to release its lease at the switchover: its passes use up the budget, and
    the STOP and completed that should set off the release are dropped. The state read afresh
    says stopped and completed, and the release follows from it (it followed only from the
    events, and waited for the coordinator's fallback in the guest's pause)."""
    reported = Reported()
    released = asyncio.Event()

    async def release() -> None:
        released.set()

    async with attached(tmp_path, process, "switch-dropped", reported) as runtime:
        runtime.role = "source"
        runtime.arm_switchover(release)
        await runtime.execute("query-name")  # the peer's passes, STOP and completed follow
        await asyncio.wait_for(released.wait(), 10)
        assert runtime.stopped and runtime.migration_status == "completed"
    names = [e.event for e in _qmp_events(reported)]
    assert "STOP" not in names  # dropped, and made up for by the state read afresh
