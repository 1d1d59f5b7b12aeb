"""qmpsim (tools/qmpsim/) against QEMU 7.2's ground truth: the wire protocol as a real QEMU
answered it, the status and event sequences of the recorded transcripts, and hostd running
against it unchanged. Real processes (the launcher daemonizes as QEMU does); every wait is on
an event or a reply, bounded by a timeout that only a failure reaches."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.qemu.scenario import assert_outcome, qmp_event, start_migration
from tests.qemu.test_migrations import assert_safe_handoff
from tools.cluster import Cluster
from tools.fleet import ForkServer
from tools.qmpsim import launch as qmpsim_launch
from tools.qmpsim.wire import GREETING
from whimbrel.v1 import common_pb2, migration_pb2

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "tools" / "qmpsim" / "qemu-system-x86_64"
# Copies of the shared transcripts this test replays (QEMU 7.2 on these machines), kept in the
# repository so the calibration never depends on what sits beside a checkout.
TRANSCRIPTS = Path(__file__).parents[1] / "fixtures" / "qmp-transcripts"
PHASE = common_pb2.MigrationPhase
LIMIT_S = 20.0


def sim_env(**knobs: str) -> dict[str, str]:
    env = dict(os.environ, WHIMBREL_QMPSIM_PYTHON=sys.executable)
    env.update({f"WHIMBREL_QMPSIM_{k.upper()}": v for k, v in knobs.items()})
    return env


@dataclass
class Sim:
    """One launched simulator: its files and pid."""

    root: Path
    name: str
    pid: int = 0

    @property
    def qmp(self) -> Path:
        return self.root / f"{self.name}.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / f"{self.name}.pid"


def launch(
    root: Path,
    name: str,
    *extra: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Sim:
    sim = Sim(root, name)
    args = [str(LAUNCHER), "-name", name, "-machine", "pc,accel=tcg", "-m", "64M",
            "-nodefaults", "-display", "none", "-sandbox", "on",
            "-qmp", f"unix:{sim.qmp},server=on,wait=off", "-daemonize",
            "-pidfile", str(sim.pidfile), *extra]  # fmt: skip
    done = subprocess.run(
        args,
        capture_output=True,
        check=False,
        env=env or sim_env(),
        timeout=LIMIT_S,
        pass_fds=pass_fds,
    )
    assert done.returncode == 0, done.stderr
    sim.pid = int(sim.pidfile.read_text())
    return sim


def kill(sim: Sim) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(sim.pid, signal.SIGKILL)


@dataclass
class RawQmp:
    """A QMP client that keeps the wire in view: replies by id, events in arrival order."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    greeting: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)
    untagged: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    next_id: int = 0
    task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: Path, negotiate: bool = True) -> RawQmp:
        reader, writer = await asyncio.open_unix_connection(str(path))
        greeting = json.loads(await reader.readline())
        client = cls(reader, writer, greeting)
        client.task = asyncio.create_task(client._read())
        if negotiate:
            assert await client.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        return client

    async def _read(self) -> None:
        while line := await self.reader.readline():
            assert line.endswith(b"\r\n"), line
            message = json.loads(line)
            async with self.changed:
                if "event" in message:
                    self.events.append(message)
                elif isinstance(message.get("id"), int):
                    self.replies[message["id"]] = message
                else:
                    self.untagged.append(message)
                self.changed.notify_all()
        async with self.changed:
            self.untagged.append({"eof": True})
            self.changed.notify_all()

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, oob: bool = False
    ) -> dict[str, Any]:
        """The reply, without its id."""
        self.next_id += 1
        ident = self.next_id
        message: dict[str, Any] = {"exec-oob" if oob else "execute": command, "id": ident}
        if arguments is not None:
            message["arguments"] = arguments
        self.writer.write(json.dumps(message).encode())
        await self.until(lambda: ident in self.replies)
        reply = dict(self.replies.pop(ident))
        reply.pop("id")
        return reply

    async def send_raw(self, data: bytes) -> dict[str, Any]:
        """Bytes as they are; the next reply without an id."""
        seen = len(self.untagged)
        self.writer.write(data)
        await self.until(lambda: len(self.untagged) > seen)
        return self.untagged[seen]

    async def until(self, ready: Any) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(ready), LIMIT_S)

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self.task


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[Sim]]:
    """Simulators a test launches (appended to this list), SIGKILLed after it."""
    launched: list[Sim] = []
    yield launched
    for sim in launched:
        kill(sim)


@pytest.fixture
async def qmp_clients() -> AsyncIterator[list[RawQmp]]:
    clients: list[RawQmp] = []
    yield clients
    for client in clients:
        await client.close()


# --- the wire protocol, as a real QEMU 7.2 answered these messages ---

WIRE_EXCHANGES: list[tuple[bytes, dict[str, Any]]] = [
    (b'{"execute": "qmp_capabilities"}',
     {"error": {"class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored"}}),
    (b'{"execute": "nope", "id": "x"}',
     {"id": "x", "error": {"class": "CommandNotFound",
                           "desc": "The command nope has not been found"}}),
    (b'{"execute": "query-status", "id": {"a": 1}}',
     {"return": {"status": "inmigrate", "singlestep": False, "running": False}, "id": {"a": 1}}),
    (b'{"execute": "query-migrate"}', {"return": {}}),
    (b'{"execute": "migrate-incoming"}',
     {"error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}),
    (b'{"execute": "migrate-incoming", "arguments": {"uri": "tcp:127.0.0.1:1", "bogus": 1}}',
     {"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}),
    (b'{"execute": "migrate-incoming", "arguments": {"uri": 5}}',
     {"error": {"class": "GenericError",
                "desc": "Invalid parameter type for 'uri', expected: string"}}),
    (b'{"exec-oob": "query-status", "id": "o1"}',
     {"id": "o1", "error": {"class": "GenericError",
                            "desc": "The command query-status does not support OOB"}}),
    (b'{"exec-oob": "migrate-recover", "arguments": {"uri": "tcp:127.0.0.1:1"}, "id": "o2"}',
     {"id": "o2", "error": {"class": "GenericError",
                            "desc": "Migrate recover can only be run when postcopy is paused."}}),
    (b'{"execute": }\n',
     {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}),
    (b"[1,2]", {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    (b'{"foo": "bar"}',
     {"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}),
    (b'{"execute": "query-status", "arguments": []}',
     {"error": {"class": "GenericError",
                "desc": "QMP input member 'arguments' must be an object"}}),
    (b'{"execute": "migrate-continue", "arguments": {"state": "pre-switchover"}}',
     {"error": {"class": "GenericError", "desc": "Migration not in expected state: none"}}),
    (b'{"execute": "migrate-start-postcopy"}',
     {"error": {"class": "GenericError", "desc": "Enable postcopy with migrate_set_capability "
                "before the start of migration"}}),
    (b'{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}}',
     {"error": {"class": "GenericError", "desc": "Guest is waiting for an incoming migration"}}),
    (b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 9999999}}',
     {"error": {"class": "GenericError", "desc": "Parameter 'downtime_limit' expects an integer "
                "in the range of 0 to (2000 * 1000) ms"}}),
    (b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
     b'[{"capability": "nope", "state": true}]}}',
     {"error": {"class": "GenericError",
                "desc": "Parameter 'capability' does not accept value 'nope'"}}),
    (b'{"execute": "announce-self", "arguments": '
     b'{"initial": 50, "max": 550, "rounds": 5, "step": 100}}', {"return": {}}),
    # An early cont on an incoming destination only arms autostart.
    (b'{"execute": "cont"}', {"return": {}}),
    (b'{"execute": "query-status"}',
     {"return": {"status": "inmigrate", "singlestep": False, "running": False}}),
]  # fmt: skip


async def test_wire_protocol_answers_as_qemu_did(
    tmp_path: Path, sims: list[Sim], qmp_clients: list[RawQmp]
) -> None:
    """Greeting, negotiation, id echo, OOB, parse errors and error texts are QEMU 7.2's."""
    sims.append(launch(tmp_path, "dst", "-incoming", "defer", "-S"))
    client = await RawQmp.connect(sims[0].qmp, negotiate=False)
    qmp_clients.append(client)
    assert client.greeting == GREETING
    assert GREETING["QMP"]["capabilities"] == ["oob"]
    assert await client.send_raw(b'{"execute": "query-status"}') == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        }
    }
    assert await client.send_raw(
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
    ) == {"return": {}}
    # A message cut in two is one message.
    client.writer.write(b'{"execute": "query-')
    assert await client.send_raw(b'status"}') == {
        "return": {"status": "inmigrate", "singlestep": False, "running": False}
    }
    for sent, expected in WIRE_EXCHANGES:
        assert await client.send_raw(sent) == expected, sent
    # migrate-incoming announces setup before its reply, whatever the events capability says;
    # query-migrate then shows where it listens, without a status yet.
    assert await client.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == {"return": {}}
    assert [e["event"] for e in client.events] == ["MIGRATION"]
    assert client.events[0]["data"] == {"status": "setup"}
    assert set(client.events[0]["timestamp"]) == {"seconds", "microseconds"}
    info = (await client.execute("query-migrate"))["return"]
    assert list(info) == ["socket-address"]
    assert info["socket-address"][0]["type"] == "inet"
    assert await client.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == {
        "error": {
            "class": "GenericError",
            "desc": "The incoming migration has already been started",
        }
    }


async def test_daemonizes_and_ends_like_qemu(tmp_path: Path, qmp_clients: list[RawQmp]) -> None:
    """The launcher exits once pidfile and socket exist; the pid is the daemon's (its command
    line names the pidfile, as hostd checks); SIGTERM says SHUTDOWN and removes both files."""
    sim = launch(tmp_path, "vm")
    try:
        cmdline = Path(f"/proc/{sim.pid}/cmdline").read_bytes().split(b"\0")  # noqa: ASYNC240
        assert str(sim.pidfile).encode() in cmdline
        assert sim.qmp.is_socket()
        client = await RawQmp.connect(sim.qmp)
        qmp_clients.append(client)
        assert (await client.execute("query-status"))["return"]["status"] == "running"
        pidfd = os.pidfd_open(sim.pid)
        os.kill(sim.pid, signal.SIGTERM)
        await client.until(lambda: {"eof": True} in client.untagged)
        assert [(e["event"], e.get("data")) for e in client.events] == [
            ("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        ]
        await asyncio.wait_for(_readable(pidfd), LIMIT_S)
        os.close(pidfd)
        assert not sim.pidfile.exists() and not sim.qmp.exists()
    finally:
        kill(sim)


@pytest.fixture
def forks(tmp_path: Path) -> Iterator[ForkServer]:
    """A qmpsim fork server, stopped after the test (the VMs it forked are the test's)."""
    server = ForkServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


async def test_fork_server_launches_the_same_daemon(
    tmp_path: Path, forks: ForkServer, qmp_clients: list[RawQmp]
) -> None:
    """Through the fork server a launch ends as it does without: the launcher exits once the
    daemon listens, the daemon's command line names its pidfile, it answers QMP, SIGTERM ends
    it and removes its files."""
    sim = launch(tmp_path, "vm", env=sim_env(forkserver=str(forks.socket)))
    try:
        cmdline = Path(f"/proc/{sim.pid}/cmdline").read_bytes().split(b"\0")  # noqa: ASYNC240
        assert str(sim.pidfile).encode() in cmdline and sim.pid != forks.pid
        client = await RawQmp.connect(sim.qmp)
        qmp_clients.append(client)
        assert (await client.execute("query-status"))["return"]["status"] == "running"
        # Opened first: once gone, the daemon is reaped by the fork server, its pid unusable.
        pidfd = os.pidfd_open(sim.pid)
        os.kill(sim.pid, signal.SIGTERM)
        await client.until(lambda: {"eof": True} in client.untagged)
        await asyncio.wait_for(_readable(pidfd), LIMIT_S)
        os.close(pidfd)
        assert not sim.pidfile.exists() and not sim.qmp.exists()
    finally:
        kill(sim)


@pytest.mark.parametrize("through_server", [True, False])
def test_a_disk_passed_as_a_descriptor_reaches_the_daemon(
    tmp_path: Path, forks: ForkServer, through_server: bool
) -> None:
    """hostd opens each disk and names it file=/proc/self/fd/N: the daemon holds that very
    file at N, whether the fork server forked it or the launcher did. The descriptor number
    is one the fork server does not have open itself."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    opened = os.open(disk, os.O_RDWR)
    number = 200
    os.dup2(opened, number)
    os.close(opened)
    env = sim_env(forkserver=str(forks.socket)) if through_server else sim_env()
    try:
        sim = launch(
            tmp_path,
            "vm",
            "-drive",
            f"file=/proc/self/fd/{number},format=raw,if=ide",
            env=env,
            pass_fds=(number,),
        )
    finally:
        os.close(number)
    try:
        assert os.readlink(f"/proc/{sim.pid}/fd/{number}") == str(disk)
    finally:
        kill(sim)


def test_the_fork_server_drops_a_request_whose_descriptors_do_not_add_up(
    tmp_path: Path, forks: ForkServer
) -> None:
    """Anyone who can reach its socket may send it anything: a request naming one number
    twice for two descriptors is dropped, and the server keeps neither (its own descriptors
    stay as they were), then serves the next launch."""
    before = sorted(os.listdir(f"/proc/{forks.pid}/fd"))
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    fds = [os.open(disk, os.O_RDONLY), os.open(disk, os.O_RDONLY)]
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(forks.socket))
            data = qmpsim_launch.encode(["-daemonize"], {}, str(tmp_path), [7, 7])
            conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""  # dropped: closed without a word
    finally:
        for fd in fds:
            os.close(fd)
    sim = launch(tmp_path, "vm", env=sim_env(forkserver=str(forks.socket)))
    kill(sim)
    assert sorted(os.listdir(f"/proc/{forks.pid}/fd")) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-pidfile", "{tmp}/missing/vm.pid"], "cannot create PID file"),
        (["-pidfile", "{tmp}/vm.pid", "-bogus"], "-bogus: invalid option"),
    ],
)
def test_fork_server_fails_a_launch_as_qemu_does(
    tmp_path: Path, forks: ForkServer, extra: list[str], message: str
) -> None:
    """A daemon that cannot start (its pidfile, a bad option) fails its launcher with the
    message and status a launch without the server gives."""
    args = [str(LAUNCHER), "-name", "vm", "-qmp", f"unix:{tmp_path}/vm.sock,server=on,wait=off",
            "-daemonize", *(a.format(tmp=tmp_path) for a in extra)]  # fmt: skip
    outcomes = []
    for env in (sim_env(forkserver=str(forks.socket)), sim_env()):
        done = subprocess.run(
            args, capture_output=True, check=False, env=env, timeout=LIMIT_S, text=True
        )
        outcomes.append((done.returncode, done.stderr.splitlines()))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == 1, outcomes
    assert any(message in line for line in outcomes[0][1]), outcomes


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, gone.set_result, None)
    try:
        await gone
    finally:
        loop.remove_reader(fd)


def test_refuses_what_it_cannot_simulate(tmp_path: Path) -> None:
    """Unknown options fail as in QEMU; options qmpsim cannot honour say so, and exit 1."""
    for extra, message in (
        (["-bogus"], "-bogus: invalid option"),
        (["-chardev", "socket,id=c"], "not simulated by qmpsim"),
        (["-drive", f"file={tmp_path}/none.img"], "Could not open"),
    ):
        args = [str(LAUNCHER), "-qmp", f"unix:{tmp_path}/q.sock,server=on,wait=off", *extra]
        done = subprocess.run(
            args, capture_output=True, check=False, env=sim_env(), timeout=LIMIT_S
        )
        assert done.returncode == 1 and message in done.stderr.decode(), done.stderr


# --- the transcripts: the same commands give the same statuses and events ---

LINE = re.compile(r"^\s*[\d.]+ \[(src|dst)\] (CMD|EVENT) (\S+) ?(.*)$")
POLL = re.compile(r"^\s*[\d.]+ \[(src|dst)\] runstate=(\S+) migstatus=(\S+)$")


@dataclass(frozen=True)
class Step:
    side: str
    kind: str  # CMD, EVENT or POLL
    name: str
    args: dict[str, Any] | None = None
    reply: str = ""
    data: Any = None


def parse_transcript(path: Path) -> list[Step]:
    steps = []
    for line in path.read_text().splitlines():
        if poll := POLL.match(line):
            steps.append(Step(poll[1], "POLL", poll[2], data=poll[3]))
            continue
        match = LINE.match(line)
        if match is None:
            continue
        side, kind, name, rest = match.groups()
        if kind == "EVENT":
            steps.append(Step(side, kind, name, data=json.loads(rest) if rest.strip() else None))
            continue
        text, _, reply = rest.partition("-> ")
        args = json.loads(text) if text.strip() else None
        steps.append(Step(side, kind, name, args, reply.strip()))
    return steps


def collapse(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Runs of MIGRATION_PASS as one (their number depends on bandwidth and dirt, not on the
    commands); the other events as they are."""
    out: list[tuple[str, Any]] = []
    for name, data in events:
        if name == "MIGRATION_PASS":
            if not out or out[-1] != ("MIGRATION_PASS", None):
                out.append(("MIGRATION_PASS", None))
            continue
        out.append((name, json.dumps(data, sort_keys=True) if data is not None else None))
    return out


def expected_before(steps: list[Step], index: int) -> int:
    """How many (collapsed) events of the command's side must have come before command
    `index` is sent: those of the transcript before it, less the run logged just before it
    (which the command itself caused, logged ahead of its reply); a poll waits for them all."""
    side = steps[index].side
    cut = index
    while (
        steps[index].kind == "CMD"
        and cut > 0
        and not (steps[cut - 1].side == side and steps[cut - 1].kind != "EVENT")
    ):
        cut -= 1
    events = [(s.name, s.data) for s in steps[:cut] if s.side == side and s.kind == "EVENT"]
    return len(collapse(events))


def rewrite(args: dict[str, Any] | None, uris: dict[str, str], root: Path) -> Any:
    if args is None or "uri" not in args:
        return args
    uri = uris.setdefault(args["uri"], f"unix:{root}/mig{len(uris)}.sock")
    return {**args, "uri": uri}


TRANSIENT = ("setup", "active", "None")


@pytest.mark.parametrize(
    ("transcript", "knobs"),
    [
        # 128 MiB at 200 kB/s with a guest dirtying 20 kB/s: passes until the rest fits in
        # 300 ms, which takes some 750 simulated seconds.
        ("s1_precopy.log", {"speed": "20000", "dirty_rate": "20000"}),
        # 128 MiB at 100 kB/s: pre-copy must still run when migrate-start-postcopy comes. The
        # link (1 MiB/s) keeps the post-copy going some 0.4 s once its bandwidth limit is
        # lifted, so the destination's poll right after still finds it in post-copy on a busy
        # machine (QEMU took 21 ms here; unlimited, the simulator took under 1 ms).
        ("s2_postcopy.log", {"speed": "200", "link": str(1 << 20)}),
    ],
)
async def test_transcript_replayed_gives_the_same_statuses_and_events(
    tmp_path: Path,
    sims: list[Sim],
    qmp_clients: list[RawQmp],
    transcript: str,
    knobs: dict[str, str],
) -> None:
    """Each command of a recorded QEMU session, sent once the events that preceded it in the
    transcript came: the same replies (statuses of query-migrate), the same run states where
    they are settled, and per side the same sequence of events."""
    path = TRANSCRIPTS / transcript
    steps = parse_transcript(path)
    env = sim_env(**knobs)
    sims.append(launch(tmp_path, "src", "-m", "128M", "-S", env=env))
    sims.append(launch(tmp_path, "dst", "-m", "128M", "-incoming", "defer", "-S", env=env))
    clients = {
        "src": await RawQmp.connect(sims[0].qmp, negotiate=False),
        "dst": await RawQmp.connect(sims[1].qmp, negotiate=False),
    }
    qmp_clients.extend(clients.values())
    uris: dict[str, str] = {}

    def seen(side: str) -> list[tuple[str, Any]]:
        return collapse([(e["event"], e.get("data")) for e in clients[side].events])

    for index, step in enumerate(steps):
        client = clients[step.side]
        if step.kind == "EVENT":
            continue
        wanted = expected_before(steps, index)
        try:
            await client.until(lambda c=step.side, n=wanted: len(seen(c)) >= n)  # type: ignore[misc]
        except TimeoutError:
            raise AssertionError(
                f"before {step}: {wanted} events wanted, {seen(step.side)}"
            ) from None
        if step.kind == "POLL":
            if step.data in TRANSIENT:
                continue  # a moment of a transfer whose pace is simulated
            status = (await client.execute("query-status"))["return"]["status"]
            migration = (await client.execute("query-migrate"))["return"].get("status")
            assert (status, str(migration)) == (step.name, step.data), step
            continue
        reply = await client.execute(step.name, rewrite(step.args, uris, tmp_path))
        if step.name == "query-migrate":
            status = re.search(r'"status": "([a-z-]+)"', step.reply)
            assert status is not None
            assert reply["return"]["status"] == status[1], step
        else:
            assert reply == json.loads(step.reply), step
    for side, client in clients.items():
        expected = collapse(
            [(s.name, s.data) for s in steps if s.side == side and s.kind == "EVENT"]
        )
        count = len(expected)
        await client.until(lambda c=side, n=count: len(seen(c)) >= n)  # type: ignore[misc]
        assert seen(side) == expected, side


async def test_killed_destination_fails_source_and_killed_source_ends_destination(
    tmp_path: Path, sims: list[Sim], qmp_clients: list[RawQmp]
) -> None:
    """As QEMU 7.2: a source whose destination died fails with a broken pipe and runs on; a
    destination whose source died mid pre-copy fails and exits."""
    env = sim_env(speed="1")
    src = launch(tmp_path, "src", env=env)
    dst = launch(tmp_path, "dst", "-incoming", "defer", "-S", env=env)
    dst2 = launch(tmp_path, "dst2", "-incoming", "defer", "-S", env=env)
    sims.extend((src, dst, dst2))
    s, d, d2 = [await RawQmp.connect(x.qmp) for x in (src, dst, dst2)]
    qmp_clients.extend((s, d, d2))
    events = {"capabilities": [{"capability": "events", "state": True}]}
    for client in (s, d, d2):
        assert await client.execute("migrate-set-capabilities", events) == {"return": {}}
    assert await s.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20}) == {"return": {}}
    uri = f"unix:{tmp_path}/a.sock"
    await d.execute("migrate-incoming", {"uri": uri})
    await s.execute("migrate", {"uri": uri})
    await d.until(lambda: d.events[-1].get("data") == {"status": "active"})
    kill(dst)
    await s.until(lambda: s.events[-1].get("data") == {"status": "failed"})
    assert (await s.execute("query-migrate"))["return"] == {
        "status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}  # fmt: skip
    assert (await s.execute("query-status"))["return"]["status"] == "running"
    # Again, to the second destination; this time the source dies.
    uri2 = f"unix:{tmp_path}/b.sock"
    await d2.execute("migrate-incoming", {"uri": uri2})
    await s.execute("migrate", {"uri": uri2})
    await d2.until(lambda: d2.events[-1].get("data") == {"status": "active"})
    kill(src)
    await d2.until(lambda: {"eof": True} in d2.untagged)
    assert d2.events[-1]["data"] == {"status": "failed"}


# --- hostd, unchanged, against qmpsim ---


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A coordinator and hosts host-a, host-b whose QEMU is qmpsim, at 50x real time."""
    env = {"WHIMBREL_QEMU": str(LAUNCHER), "WHIMBREL_QMPSIM_PYTHON": sys.executable,
           "WHIMBREL_QMPSIM_SPEED": "50"}  # fmt: skip
    c = Cluster(tmp_path, env=env)
    try:
        yield c.start("host-a", "host-b")
    finally:
        c.teardown()


def start(cluster: Cluster, mode: int, **parameters: int) -> None:
    policy = migration_pb2.StartMigrationRequest(
        vm="vm-1", destination="host-b", mode=mode, migration_id="m-1"
    )
    policy.policy.parameters.MergeFrom(policy.policy.parameters.__class__(**parameters))
    cluster.migrations.StartMigration(policy)


def test_hostd_precopy_completes_against_qmpsim(cluster: Cluster) -> None:
    """Pre-copy with pause-before-switchover, over migration TLS, hands the VM to host-b."""
    cluster.define_and_start("vm-1", "host-a")
    start(cluster, common_pb2.MIGRATION_MODE_PRECOPY)
    final = cluster.watch("m-1", timeout=60)
    assert final.phase == PHASE.MIGRATION_PHASE_COMPLETED and not final.postcopy, final.reason
    assert_safe_handoff(cluster, "m-1")


def test_hostd_postcopy_completes_against_qmpsim(cluster: Cluster) -> None:
    """Mode postcopy switches after the first pass; the destination runs while pages flow."""
    cluster.define_and_start("vm-1", "host-a")
    # 64 MiB at 100 kB/s would take minutes of simulated pre-copy: only post-copy ends it.
    start(cluster, common_pb2.MIGRATION_MODE_POSTCOPY, max_bandwidth=100_000)
    final = cluster.watch("m-1", timeout=60)
    assert final.phase == PHASE.MIGRATION_PHASE_COMPLETED and final.postcopy, final.reason
    assert_safe_handoff(cluster, "m-1")


def test_hostd_rolls_back_when_destination_is_killed_mid_precopy(cluster: Cluster) -> None:
    """SIGKILL of the destination's qmpsim mid pre-copy: rolled back, the VM runs on host-a."""
    cluster.define_and_start("vm-1", "host-a")
    head = cluster.head()
    start_migration(cluster, common_pb2.MIGRATION_MODE_PRECOPY, max_bandwidth=100_000)
    cluster.wait_event(qmp_event("host-a", "MIGRATION_PASS"), from_seq=head)
    os.kill(cluster.qemu_pid("host-b"), signal.SIGKILL)
    final = assert_outcome(cluster, PHASE.MIGRATION_PHASE_ROLLED_BACK, "host-a")
    assert "QEMU exited" in final.reason or "migration failed in QEMU" in final.reason
