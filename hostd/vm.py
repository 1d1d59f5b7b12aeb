"""One VM's QEMU on this host: its QMP session, its events, its exit.

Every QMP event goes up with QEMU's timestamp; after each MIGRATION_PASS the source samples
query-migrate; every connect takes a query-status + query-migrate snapshot (QMP events are lost
while nobody listens); the process's exit is watched through a pidfd and reported once, with the
reason hostd knows (e.g. it killed it itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from hostd import migration_socket, qemu
from hostd.errors import HostdError, QmpError, QmpUnavailable, sendable
from hostd.event_budget import DROPPED_EVENT, REPORT_EVERY_S, RecordBudget
from hostd.qmp import QmpSession
from whimbrel import failpoints, files, protocol
from whimbrel.v1 import common_pb2, events_pb2

Emit = Callable[[Message, int], Awaitable[None]]
# A source stopped in one of these can no longer be resumed by QEMU itself, so its lease may go.
# QEMU 7.2 resumes a pre-copy source whose migration fails or is cancelled, from pre-switchover
# and device too (it was running when the switch began); once post-copy is active or the
# migration completed it never does (a failed post-copy pauses instead).
SWITCHOVER_STATUSES = ("postcopy-active", "completed")
# How long a command that lost QMP waits for its QEMU's exit to be reported before failing.
QMP_LOST_EXIT_WAIT_S = 1.0
# A destination in one of these has the state the source sent once it stopped (post-copy: its
# device state, then pages on demand; pre-copy: everything), and so the source has let go of
# the VM's disks.
SOURCE_STATE_HERE_STATUSES = ("postcopy-active", "postcopy-paused", "postcopy-recover", "completed")
# How long a destination's cont waits for that state, and then for the guest to start: both
# follow the source's stop within milliseconds here; one that never comes fails the command.
CONT_WAIT_LIMIT_S = 30.0
# How long attaching waits for QMP's greeting (a QEMU that is stopped or hung never sends it).
QMP_CONNECT_LIMIT_S = 10.0
# While a source transfers, its progress is sampled this often besides at each pass: a pass
# can take minutes, and the coordinator judges a stuck stream (the policy's
# progress_timeout_s) by samples that show no bytes sent, in pre-copy and in post-copy alike.
PROGRESS_SAMPLE_EVERY_S = 5.0
# The statuses in which a source sends memory on its own, so that no byte sent means stuck.
TRANSFERRING = ("active", "postcopy-active")
# A query-migrate status longer than this is none of QEMU's (short words: "postcopy-recover").
MAX_STATUS = 32
# QEMU's error-desc sent with a failed migration, at most (the coordinator bounds it too).
MAX_ERROR_TEXT = 256
# A snapshot of a QEMU whose main thread is stuck (storage, a missing post-copy page) must not
# hold up the host's hello or a report: past this it says "QMP unreachable".
SNAPSHOT_LIMIT_S = 2.0
# QEMU's own events are a few hundred bytes; one larger comes from a broken or hostile QEMU and
# is logged as a marker, so it cannot fill this host's outbox or the coordinator's log.
MAX_EVENT_DATA = protocol.MAX_QMP_EVENT_DATA
log = logging.getLogger(__name__)


class VmRuntime:
    def __init__(self, spec: common_pb2.VmSpec, root: Path, emit: Emit, role: str = "") -> None:
        self.spec = spec
        self.name = spec.name
        self.paths = qemu.VmPaths(root)
        self.emit = emit
        self.role = role
        self.pid = 0
        # The QEMU process, held from launch (or reattach) until it is gone, QMP or not.
        self._pidfd = -1
        self.qmp: QmpSession | None = None
        self.exit_reason = ""
        self.killed_by_us = False
        self.exited = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._qmp_watch: asyncio.Task[None] | None = None
        self._beside_tasks: set[asyncio.Task[None]] = set()
        self._last_pass = 0
        self.migration_status = ""
        self.stopped = False
        # Whether QEMU last said the guest runs (a RESUME event, or a snapshot's runstate).
        self.running = False
        # What `_until` waits on, made only while something waits: set (and dropped) at the
        # next QMP event or QEMU's exit, so the event stream allocates nothing otherwise.
        self._changed: asyncio.Event | None = None
        # Run once when this source has stopped to switch over (set by START_MIGRATION).
        self.at_switchover: Callable[[], Awaitable[None]] | None = None
        # Send migrate-continue once this source has stopped in pre-switchover (set by
        # START_MIGRATION).
        self.continue_at_pre_switchover = False
        # Run once (beside the event stream) when this destination's QEMU reports
        # postcopy-active (set by PREPARE_INCOMING).
        self.at_incoming_postcopy: Callable[[], Coroutine[Any, Any, None]] | None = None
        # Network phases run one at a time; the last one that succeeded here.
        self.network_lock = asyncio.Lock()
        self.network_phase = ""
        # The phase this hostd process reported (a phase read back from disk at a restart may
        # have died unreported with the previous one).
        self.network_phase_reported = ""
        self.log = log.getChild(self.name)
        # Record-only QMP events a guest could send at will go up at a bounded rate.
        self._record_budget = RecordBudget()
        # Where this source's migration goes (START_MIGRATION's URI), until its connection got
        # TCP_NODELAY (hostd.migration_socket).
        self.nodelay_for = ""
        self._drop_report: asyncio.Task[None] | None = None
        # Reading QEMU's state afresh after dropped events, and whether another read is due.
        self._afresh: asyncio.Task[None] | None = None
        self._afresh_wanted = False
        self._progress_watch: asyncio.Task[None] | None = None

    def save(self) -> None:
        """Keep the spec and role beside the QEMU files, for a restarted hostd."""
        self.paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = files.open_dir(self.paths.root)
        try:
            for name, data in (("spec.pb", self.spec.SerializeToString()),
                               ("role", self.role.encode())):  # fmt: skip
                fd = files.open_in(dir_fd, name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                with open(fd, "wb") as f:
                    f.write(data)
        finally:
            os.close(dir_fd)

    def save_network_phase(self, phase: str) -> None:
        """The network phase that last succeeded, kept so a restarted hostd still runs
        `release` for a QEMU that exits (or exited) while no hostd watched."""
        self.network_phase = phase
        self.paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = files.open_dir(self.paths.root)
        try:
            fd = files.open_in(dir_fd, "network", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with open(fd, "wb") as f:
                f.write(phase.encode())
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, root: Path, emit: Emit) -> VmRuntime:
        dir_fd = files.open_dir(root)
        try:
            with open(files.open_in(dir_fd, "spec.pb", os.O_RDONLY), "rb") as f:
                spec = common_pb2.VmSpec.FromString(f.read())
            role, network_phase = (_read_optional(dir_fd, name) for name in ("role", "network"))
        finally:
            os.close(dir_fd)
        runtime = cls(spec, root, emit, role)
        runtime.network_phase = network_phase
        return runtime

    def track(self, pid: int) -> None:
        """Hold QEMU `pid` (a pidfd) and report its exit once, whatever becomes of QMP."""
        self.pid = pid
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = -1  # already gone: the watch reports it at once
        else:
            if not qemu.still_recorded(self.paths, pid):
                # The QEMU died and another process took its pid: not ours to watch or kill.
                os.close(self._pidfd)
                self._pidfd = -1
        self._watch = asyncio.create_task(self._watch_exit(), name=f"exit-watch-{self.name}")

    async def attach(self, pid: int) -> None:
        """Watch a running QEMU's exit, connect QMP to it, and report a snapshot. If QMP is
        unreachable the process stays tracked (and killable) all the same."""
        if self._watch is None:
            self.track(pid)
        session = QmpSession(self.name, str(self.paths.qmp))
        try:
            await asyncio.wait_for(
                session.connect(self._on_event, self._events_dropped), QMP_CONNECT_LIMIT_S
            )
        except TimeoutError as err:
            await session.close()
            raise QmpUnavailable(
                f"QMP at {self.paths.qmp} did not greet within {QMP_CONNECT_LIMIT_S:g} s",
                vm=self.name,
            ) from err
        self.qmp = session
        self._qmp_watch = asyncio.create_task(
            self._watch_qmp(session), name=f"qmp-watch-{self.name}"
        )
        observation = await self.snapshot()
        await self.emit(events_pb2.VmObserved(observation=observation, reason="qmp-connect"), 0)

    async def _watch_qmp(self, session: QmpSession) -> None:
        """A QMP session that ends while its QEMU lives (QEMU sent garbage, a message beyond
        the reader's limit, or closed the socket) leaves a QEMU hostd cannot steer: it is
        reported broken (still tracked by its pid, so a destroy kills it)."""
        await session.wait_closed()
        # Usually QEMU exited: its exit watch reports that within milliseconds.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), QMP_LOST_EXIT_WAIT_S)
        if self.exited.is_set() or self.qmp is not session:
            return
        self.log.error("QMP of QEMU %d was lost while it runs: reported broken", self.pid)
        self.qmp = None
        await session.close()
        observation = await self.snapshot()
        await self.emit(events_pb2.VmObserved(observation=observation, reason="qmp-broken"), 0)

    async def snapshot(self) -> common_pb2.VmObservation:
        alive = bool(self.pid) and qemu.alive(self.pid)
        observation = common_pb2.VmObservation(
            vm=self.name,
            process_alive=alive,
            pid=self.pid if alive else 0,
            migration_role=self.role,
        )
        if alive and self.qmp is not None:
            # QEMU stamps its events with the same wall clock: one stamped before this is
            # reflected in the answers below, however late it is delivered.
            queried_at_us = time.time_ns() // 1000
            try:
                status, migrate = await asyncio.wait_for(self._state(), SNAPSHOT_LIMIT_S)
                observation.runstate = _status(status.get("status"))
                observation.migration_status = _status(migrate.get("status"))
                # What QEMU says now, for a hostd that restarted (events lost meanwhile); any
                # event still queued behind these answers updates them again, in order.
                self.running = observation.runstate == "running"
                self.stopped = not self.running
                self.migration_status = observation.migration_status
                observation.qmp_reachable = True
                observation.queried_at_us = queried_at_us
            except HostdError as err:
                self.log.warning("snapshot incomplete: %s", err)
            except TimeoutError:
                self.log.warning("snapshot incomplete: QMP did not answer in %g s",
                                 SNAPSHOT_LIMIT_S)  # fmt: skip
        return observation

    async def _state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return await self.query("query-status"), await self.query("query-migrate")

    async def query(self, command: str) -> dict[str, Any]:
        """A query's answer, which QEMU always gives as an object: anything else is refused as
        QEMU's error, so a broken QEMU cannot crash what reads it."""
        reply = await self.execute(command)
        if not isinstance(reply, dict):
            raise QmpError(
                f"{command}: QEMU answered {type(reply).__name__}, not an object",
                vm=self.name, command=command, error_class="", reply=reply,
            )  # fmt: skip
        return reply

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, oob: bool = False
    ) -> Any:
        if self.qmp is None:
            raise QmpUnavailable(f"{command}: no QMP session", vm=self.name)
        try:
            return await self.qmp.execute(command, arguments, oob=oob)
        except QmpUnavailable:
            # QMP is usually lost because QEMU died. Its exit is reported first (the exit
            # watch follows within milliseconds), so the coordinator never reads this failure
            # while it still believes the VM runs: a rollback would otherwise end with "the
            # source runs" on a dead source. Bounded, for a QEMU that lives on without QMP.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exited.wait(), QMP_LOST_EXIT_WAIT_S)
            raise

    def _signal_change(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _until(self, ready: Callable[[], bool], what: str, limit: float) -> None:
        """Until `ready()`, judged after each QMP event; raises if QEMU exits first, or after
        `limit` seconds."""
        deadline = asyncio.get_running_loop().time() + limit
        while not ready():
            if self.exited.is_set():
                raise QmpUnavailable(f"QEMU exited while waiting until {what}", vm=self.name)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise HostdError(f"waited {limit:g} s in vain until {what}", vm=self.name)
            with contextlib.suppress(TimeoutError):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def until_source_state_here(self, limit: float = CONT_WAIT_LIMIT_S) -> None:
        """For a destination: until QEMU has the state the source sent once it stopped."""

        def ready() -> bool:
            if self.migration_status in ("failed", "cancelled"):
                raise HostdError(f"incoming migration {self.migration_status}", vm=self.name)
            return self.migration_status in SOURCE_STATE_HERE_STATUSES

        await self._until(ready, "the source's state is here", limit)

    async def until_running(self, limit: float = CONT_WAIT_LIMIT_S) -> None:
        await self._until(lambda: self.running, "the guest runs", limit)

    async def _on_event(self, name: str, data: dict[str, Any], time_us: int) -> None:
        if not self._record_budget.admit(name):
            if self._drop_report is None:
                self._drop_report = asyncio.create_task(self._report_dropped_later())
            if name in protocol.QMP_EVENTS_ACTED_ON and self.qmp is not None:
                self.qmp.dropped()  # QEMU's state is read afresh instead (_events_dropped)
            return
        if name == "MIGRATION" and data.get("status") == "failed":
            # Why, in QEMU's words, reaches the log before the failure it explains, so the
            # coordinator's decision on it can say so (a TLS certificate refused, a peer gone).
            await self._report_failure()
        data_json = json.dumps(data, sort_keys=True)
        if len(data_json) > MAX_EVENT_DATA:
            self.log.warning("QMP event %s with %d bytes of data logged without it", name,
                             len(data_json))  # fmt: skip
            data, data_json = {}, json.dumps({"whimbrel_dropped_bytes": len(data_json)})
        payload = events_pb2.QmpEventReceived(vm=self.name, event=name, data_json=data_json)
        await self.emit(payload, time_us)
        failpoints.hit(f"hostd.after-qmp-event.{name}.{data.get('status', '')}".rstrip("."))
        if name == "MIGRATION":
            self.migration_status = str(data.get("status", ""))
            if self.nodelay_for and self.migration_status == "active":
                # Connected by now; the final flush that Nagle would hold is a pass away.
                uri, self.nodelay_for = self.nodelay_for, ""
                self._beside(self._set_nodelay(uri))
        elif name in ("STOP", "RESUME"):
            self.stopped = name == "STOP"
            self.running = name == "RESUME"
        if name in ("MIGRATION", "STOP"):
            await self._act_on_state()
        else:
            self._signal_change()
        # Only a source samples its progress (the policy and the stuck-stream watch read it);
        # a destination's samples would only compete with the handoff for QMP and CPU.
        if self.role != "source":
            return
        if name == "MIGRATION" and self.migration_status == "setup":
            self._last_pass = 0  # a new migration (after one rolled back) counts from 1 again
        if name == "MIGRATION" and self.migration_status in TRANSFERRING:
            self.watch_progress()  # again after a post-copy recovery
        if name == "MIGRATION_PASS" and self.migration_status == "active":
            self._last_pass = int(data.get("pass", 0))
            self._sample_soon(self._last_pass)
        elif name == "MIGRATION" and self.migration_status == "completed":
            # The final totals (bytes transferred), once the switch is long over.
            self._sample_soon(self._last_pass)

    def arm_switchover(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run `action` once this source has stopped to switch over. A marker file beside the
        QEMU files says so to a restarted hostd, which arms it again (else the coordinator's
        late fallback decides, a second into the guest's pause)."""
        self.at_switchover = action
        self._armed_marker.touch()

    def disarm_switchover(self) -> None:
        self.at_switchover = None
        self._armed_marker.unlink(missing_ok=True)
        self.disarm_continue()

    def arm_continue_at_pre_switchover(self) -> None:
        """Send migrate-continue once this source has stopped in pre-switchover; kept in a
        marker file for a restarted hostd, as the switchover action is."""
        self.continue_at_pre_switchover = True
        self._continue_marker.touch()

    def disarm_continue(self) -> None:
        self.continue_at_pre_switchover = False
        self._continue_marker.unlink(missing_ok=True)

    @property
    def switchover_was_armed(self) -> bool:
        return self._armed_marker.exists()

    @property
    def continue_was_armed(self) -> bool:
        return self._continue_marker.exists()

    @property
    def _armed_marker(self) -> Path:
        return self.paths.root / "armed-at-switchover"

    @property
    def _continue_marker(self) -> Path:
        return self.paths.root / "armed-continue-at-pre-switchover"

    def maybe_continuing_switchover(self) -> None:
        """Continue the switchover once this source has stopped in pre-switchover. Beside the
        event stream: the answer to migrate-continue comes in on the same QMP connection."""
        if self.migration_status in ("failed", "cancelling", "cancelled"):
            self.disarm_continue()
            return
        if not (self.stopped and self.migration_status == "pre-switchover"):
            return
        self.continue_at_pre_switchover = False
        self._beside(self._continue_switchover())

    async def _continue_switchover(self) -> None:
        failpoints.hit("hostd.before-continue-at-pre-switchover")
        try:
            await self.execute("migrate-continue", {"state": "pre-switchover"})
        except HostdError as err:
            self.log.error("switchover not continued at pre-switchover (the coordinator's "
                           "continue follows): %s", err)  # fmt: skip
        # Only now: a hostd that dies before QEMU answered finds the marker and sends it again
        # (QEMU takes it only in pre-switchover, so a second one changes nothing).
        self._continue_marker.unlink(missing_ok=True)

    async def maybe_switching_over(self) -> None:
        """Run the switchover action once the source has stopped to switch over. QEMU's order
        differs by mode (post-copy: postcopy-active, then STOP; pre-copy: STOP, then
        completed), so it is judged after each event; the event itself is already recorded,
        so the log shows the stop before whatever the action reports."""
        if self.migration_status in ("failed", "cancelling", "cancelled"):
            self.disarm_switchover()
            return
        if not (self.stopped and self.migration_status in SWITCHOVER_STATUSES):
            return
        action = self.at_switchover
        self.disarm_switchover()
        if action is not None:
            await action()

    async def sample_before_destroy(self, limit: float = 0.5) -> None:
        """A source's totals once more before its QEMU is destroyed: the destroy that follows
        a completion can come before the sample taken at the completed event (the coordinator
        may learn of the completion from the destination first). Bounded: a QEMU that does not
        answer is destroyed all the same."""
        if self.role != "source" or self.exited.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sample(self._last_pass), limit)

    async def _set_nodelay(self, uri: str) -> None:
        try:
            done = await asyncio.to_thread(migration_socket.set_nodelay, self.pid, uri)
        except OSError as err:
            self.log.warning("TCP_NODELAY not set on the migration to %s: %s", uri, err)
            return
        if not done:
            self.log.info("no connection to %s found to set TCP_NODELAY on", uri)

    async def _report_dropped_later(self) -> None:
        await asyncio.sleep(REPORT_EVERY_S)
        self._drop_report = None
        await self._report_dropped()

    async def _report_dropped(self) -> None:
        """The counts of record-only events dropped since the last report, as one event."""
        dropped = self._record_budget.take_dropped()
        if not dropped:
            return
        self.log.warning("QMP events beyond the record budget dropped: %s", dropped)
        data = {"dropped": dropped, "period_s": REPORT_EVERY_S}
        payload = events_pb2.QmpEventReceived(
            vm=self.name, event=DROPPED_EVENT, data_json=json.dumps(data, sort_keys=True)
        )
        await self.emit(payload, time.time_ns() // 1000)

    async def _act_on_state(self) -> None:
        """What this hostd was asked to do by itself at a point of the migration (continue at
        pre-switchover, release at the switchover, enable networking at a destination's
        postcopy-active), once the state says it is there; and wake whoever waits on it."""
        self._signal_change()
        if self.continue_at_pre_switchover:
            self.maybe_continuing_switchover()
        if self.at_switchover is not None:
            await self.maybe_switching_over()
        if self.at_incoming_postcopy is not None and self.migration_status == "postcopy-active":
            action, self.at_incoming_postcopy = self.at_incoming_postcopy, None
            self._beside(action())

    def _events_dropped(self, count: int) -> None:
        """`count` events were dropped (beyond the event queue, or events acted on beyond
        their budget): QEMU's state is read afresh instead, now that the events queued before
        are handled; while drops go on, at most once a period."""
        self.log.warning("%d QMP events dropped: reading QEMU's state afresh", count)
        self._afresh_wanted = True
        if self._afresh is None or self._afresh.done():
            self._afresh = asyncio.create_task(self._read_afresh())

    async def _read_afresh(self) -> None:
        while self._afresh_wanted:
            self._afresh_wanted = False
            observation = await self.snapshot()
            await self.emit(
                events_pb2.VmObserved(observation=observation, reason="qmp-events-dropped"), 0
            )
            # What the dropped events would have set off (a switchover's release, say).
            await self._act_on_state()
            await asyncio.sleep(REPORT_EVERY_S)

    def watch_progress(self) -> None:
        """Sample this source's progress every few seconds while it transfers (from its
        "active" or "postcopy-active", or a restarted hostd's snapshot saying so)."""
        if self.role != "source" or self.migration_status not in TRANSFERRING:
            return
        if self._progress_watch is None or self._progress_watch.done():
            self._progress_watch = asyncio.create_task(self._sample_while_transferring())

    async def _sample_while_transferring(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_SAMPLE_EVERY_S)
            if self.migration_status not in TRANSFERRING or self.exited.is_set():
                return
            await self._sample(0)  # between passes: bytes sent, no yardstick of convergence

    def _sample_soon(self, pass_: int) -> None:
        # Sampled beside the event stream, so the next events are not held up by it.
        self._beside(self._sample(pass_))

    def _beside(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._beside_tasks.add(task)
        task.add_done_callback(self._beside_tasks.discard)

    async def _sample(self, pass_: int) -> None:
        try:
            info = await asyncio.wait_for(self.query("query-migrate"), SNAPSHOT_LIMIT_S)
        except (HostdError, TimeoutError):
            return
        ram = info.get("ram")
        ram = ram if isinstance(ram, dict) else {}
        status = info.get("status")
        stats = events_pb2.MigrationStatsSampled(
            vm=self.name,
            status=_status(status),
            total_bytes=_count(ram.get("total")),
            transferred_bytes=_count(ram.get("transferred")),
            remaining_bytes=_count(ram.get("remaining")),
            dirty_pages_rate=_count(ram.get("dirty-pages-rate")),
            mbps=_rate(ram.get("mbps")),
            expected_downtime_ms=_count(info.get("expected-downtime")),
        )
        setattr(stats, "pass", pass_)
        await self.emit(stats, 0)

    async def _report_failure(self) -> None:
        # Bounded: it runs in line with the VM's events, which a QEMU that never answers
        # would otherwise hold up for good.
        try:
            info = await asyncio.wait_for(self.query("query-migrate"), SNAPSHOT_LIMIT_S)
        except (HostdError, TimeoutError):
            return
        error = sendable(str(info.get("error-desc", ""))[:MAX_ERROR_TEXT])
        if error:
            failed = events_pb2.MigrationStatsSampled(
                vm=self.name, status="failed", error_desc=error
            )
            await self.emit(failed, 0)

    async def _watch_exit(self) -> None:
        if self._pidfd >= 0:
            await qemu.wait_pidfd(self._pidfd, self.pid)
        reason = self.exit_reason or "QEMU process ended"
        self.log.info("QEMU %d exited: %s", self.pid, reason)
        if self.qmp is not None:
            await self.qmp.close()
        if self._drop_report is not None:
            self._drop_report.cancel()
            self._drop_report = None
        # What the guest flooded QEMU with goes up before the exit that ends this host's part.
        await self._report_dropped()
        signum = 9 if self.killed_by_us else 0
        exited = events_pb2.QemuExited(
            vm=self.name, pid=self.pid, exit_code=-1, signal=signum, reason=reason
        )
        await self.emit(exited, 0)
        self.exited.set()
        self._signal_change()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    async def kill(self, reason: str) -> None:
        """SIGKILL and wait until the exit has been reported."""
        if not self.pid or self.exited.is_set():
            return
        self.exit_reason, self.killed_by_us = reason, True
        if self._pidfd >= 0:
            # Through the pidfd: never a process that reused the pid. The exit watch (the
            # pidfd's one reader) reports the exit.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            try:
                await asyncio.wait_for(self.exited.wait(), 10.0)
            except TimeoutError:
                raise HostdError(
                    f"QEMU {self.pid} did not die after SIGKILL", vm=self.name
                ) from None
            return
        # No pidfd: the QEMU was gone when it was to be held, and the watch reports that at
        # once. Its pid may be another process's by now: never signalled.
        await self.exited.wait()

    async def quit(self, reason: str, limit: float = 10.0) -> None:
        """Ask QEMU to quit; kill it if it does not within `limit` seconds."""
        self.exit_reason = reason
        try:
            # Bounded as a whole: a QEMU that never answers the quit is killed on time too.
            async with asyncio.timeout(limit):
                with contextlib.suppress(HostdError):
                    await self.execute("quit")
                await self.exited.wait()
        except TimeoutError:
            await self.kill(f"{reason} (quit timed out)")

    async def close(self) -> None:
        """Stop watching without touching QEMU (hostd shutting down)."""
        if self._drop_report is not None:
            self._drop_report.cancel()
        if self._afresh is not None:
            self._afresh.cancel()
        if self._progress_watch is not None:
            self._progress_watch.cancel()
        if self._qmp_watch is not None:
            self._qmp_watch.cancel()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self.qmp is not None:
            await self.qmp.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _status(value: object) -> str:
    """A status word from QEMU's answers (query-status, query-migrate): a short ASCII string,
    else "". A hello carries every VM's: one of megabytes had it refused for good, and one
    protobuf cannot carry (a lone surrogate) had it never built."""
    if isinstance(value, str) and len(value) <= MAX_STATUS and value.isascii():
        return value
    return ""


def _count(value: object) -> int:
    """A count from QEMU's query-migrate (bytes, pages, ms): a whole number that fits the
    event's field, else 0. A broken or hostile QEMU can then neither end the sampling with an
    exception nor put nonsense in the log."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        return 0
    return value


def _rate(value: object) -> float:
    """A rate from query-migrate: a finite number from 0 up, else 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        rate = float(value)
    except OverflowError:  # a whole number beyond any float
        return 0.0
    return rate if math.isfinite(rate) and rate >= 0 else 0.0


def _read_optional(dir_fd: int, name: str) -> str:
    """The text of file `name` in `dir_fd`, "" when there is none (an older hostd's state)."""
    try:
        with open(files.open_in(dir_fd, name, os.O_RDONLY), "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        return ""
