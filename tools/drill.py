"""A fault drill at the switchover: real coordinator, two hostd, real QEMU, one fault per run,
struck a few milliseconds after an event of the switchover is read from the log.

    python -m tools.drill --runs N --seed S [--first K] [--root DIR] [--keep]

Run i (counted from --first) is fixed by (S, i): the fault kind is FAULTS[i % 6], the mode
MODES[(i // 6) % 2], the trigger TRIGGERS[(i % 6 + (i // 6) % 2 + i // 12) % 3] (so every 36
runs cover fault x mode x trigger once), and the delay after the trigger (0-30 ms) and a
SIGSTOP's length come from random.Random(f"{S}-{i}"). `--runs 1 --first i --seed S` replays
one run. Killed daemons are started again with the same host id and state dir (a stopped
coordinator gets SIGCONT).

After each run it checks: the migration is terminal; at most one QEMU for the VM is alive; the
lease holder is the host where the VM runs; InvariantChecker over the log finds nothing and
`whimbrel-audit verify --final` exits 0; no healthy VM lost (a fault that killed no QEMU leaves
the VM running). One JSON line per run on stdout, then a table fault x mode x outcome; exit 1
if any run failed a check. A failed run's directory is kept (logs and the event log).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from coordinator.core import Event
from coordinator.core.invariants import InvariantChecker
from hostd import qemu
from tools.cluster import BIN, Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2, events_pb2, migration_pb2, vm_pb2

__all__ = ["FAULTS", "MODES", "TRIGGERS", "Run", "plan", "run_batch", "run_one", "table"]

SOURCE, DESTINATION = "host-a", "host-b"
FAULTS = (
    "kill-coordinator",
    "kill-source-hostd",
    "kill-destination-hostd",
    "kill-source-qemu",
    "kill-destination-qemu",
    "stop-coordinator",
)
MODES = {
    "precopy": common_pb2.MIGRATION_MODE_PRECOPY,
    "postcopy": common_pb2.MIGRATION_MODE_POSTCOPY,
}
TRIGGERS = ("source-stop", "lease-release", "resume-command")
PHASE = common_pb2.MigrationPhase
TERMINAL = (
    PHASE.MIGRATION_PHASE_COMPLETED,
    PHASE.MIGRATION_PHASE_ROLLED_BACK,
    PHASE.MIGRATION_PHASE_FENCED,
)
RAM_MIB = 32
# Post-copy pulls the 32 MiB of random RAM at this rate: about a second while the destination
# runs and pages still flow, so faults after the resume land in the middle of it.
POSTCOPY_BANDWIDTH = 32 << 20
SETTLE_S = 30.0
QUIET_S = 1.0


@dataclass
class Run:
    """One run's plan and what came of it."""

    seed: int
    index: int
    fault: str
    mode: str
    trigger: str
    delay_ms: float
    stop_s: float
    triggered: bool = False
    # What the fault did (the pid a QEMU kill hit, or why it hit none).
    struck: str = ""
    # Milliseconds from the trigger's own timestamp to the fault (stream latency + delay).
    fault_after_ms: float = 0.0
    phase: str = ""
    reason: str = ""
    vm_status: str = ""
    vm_host: str = ""
    lease_holder: str = ""
    live_qemus: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    dir: str = ""
    # The switchover from the log (see `timeline`), reported for failed runs and lost VMs.
    timeline: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        status = self.vm_status.removeprefix("VM_STATUS_").lower()
        phase = self.phase.removeprefix("MIGRATION_PHASE_").lower()
        where = f"@{self.vm_host}" if status == "running" else ""
        return f"{phase or 'open'}/{status}{where}" + ("" if self.triggered else " (no trigger)")


def plan(seed: int, index: int) -> Run:
    rng = random.Random(f"{seed}-{index}")
    fault = FAULTS[index % 6]
    mode = list(MODES)[(index // 6) % 2]
    trigger = TRIGGERS[(index % 6 + (index // 6) % 2 + index // 12) % 3]
    return Run(seed, index, fault, mode, trigger, round(rng.uniform(0, 30), 2),
               round(rng.uniform(0.5, 3.0), 2))  # fmt: skip


def _trigger(name: str) -> Callable[[Event], bool]:
    def test(e: Event) -> bool:
        p = e.payload
        if isinstance(p, events_pb2.MigrationFinished):
            return True  # over before the trigger: nothing to strike
        if name == "source-stop":
            return (
                isinstance(p, events_pb2.QmpEventReceived)
                and e.origin_host == SOURCE
                and p.event == "STOP"
            )
        if name == "lease-release":
            return isinstance(p, events_pb2.LeaseReleased) and p.holder == SOURCE
        return (
            isinstance(p, events_pb2.CommandIssued)
            and p.kind == events_pb2.COMMAND_KIND_RESUME_VM
            and p.host_id == DESTINATION
        )

    return test


def _strike(cluster: Cluster, run: Run) -> None:
    """The fault, then what an operator's supervisor does: restart what was killed."""
    if run.fault == "kill-coordinator":
        address = cluster.address
        cluster.kill_process("coordinator")
        cluster.start_coordinator(listen=address)
    elif run.fault in ("kill-source-hostd", "kill-destination-hostd"):
        host = SOURCE if run.fault == "kill-source-hostd" else DESTINATION
        cluster.kill_process(host)
        cluster.start_hostd(host)
    elif run.fault in ("kill-source-qemu", "kill-destination-qemu"):
        host = SOURCE if run.fault == "kill-source-qemu" else DESTINATION
        try:
            pid = cluster.qemu_pid(host)
            os.kill(pid, signal.SIGKILL)
            run.struck = f"killed QEMU {pid}"
            deadline = time.monotonic() + 10
            while qemu.alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        except (ProcessLookupError, FileNotFoundError) as err:
            run.struck = f"no QEMU to kill: {err}"  # e.g. a source already destroyed
    else:
        coordinator = cluster.processes["coordinator"].popen
        coordinator.send_signal(signal.SIGSTOP)
        time.sleep(run.stop_s)
        coordinator.send_signal(signal.SIGCONT)


def _live_qemus(cluster: Cluster) -> list[str]:
    return sorted(
        pidfile.parts[-4]
        for pidfile in cluster.root.glob("*/vms/vm-1/qemu.pid")
        if qemu.alive(int(pidfile.read_text()))
    )


def _retry(call: Callable[[], object], timeout: float) -> object:
    """`call` until it does not fail with UNAVAILABLE (a coordinator restarting or recovering)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if time.monotonic() > deadline or err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise
            time.sleep(0.2)


def _check(cluster: Cluster, run: Run) -> list[str]:
    """The run's checks, as they stand now (an empty list: all hold)."""
    failures = []
    migration = _retry(
        lambda: cluster.migrations.GetMigration(
            migration_pb2.GetMigrationRequest(migration_id="m-1"), timeout=5
        ),
        10,
    )
    assert isinstance(migration, migration_pb2.Migration)
    vm = _retry(lambda: cluster.vms.GetVm(vm_pb2.GetVmRequest(name="vm-1"), timeout=5), 10)
    assert isinstance(vm, vm_pb2.Vm)
    run.phase, run.reason = PHASE.Name(migration.phase), migration.reason
    run.vm_status, run.vm_host = vm_pb2.VmStatus.Name(vm.status), vm.host
    run.lease_holder, run.live_qemus = vm.lease_holder, _live_qemus(cluster)
    if migration.phase not in TERMINAL:
        failures.append(f"migration not terminal: {run.phase}")
    if len(run.live_qemus) > 1:
        failures.append(f"QEMU alive on {run.live_qemus}")
    if vm.status == vm_pb2.VM_STATUS_RUNNING:
        if vm.lease_holder != vm.host:
            failures.append(f"runs on {vm.host}, lease held by {vm.lease_holder or 'nobody'}")
        if run.live_qemus != [vm.host]:
            failures.append(f"runs on {vm.host}, live QEMU on {run.live_qemus}")
    elif "qemu" not in run.fault:
        failures.append(f"healthy VM not running: {run.vm_status} ({vm.lost_reason})")
    events = cluster.events()
    # Finding 3: before the destination ran, the complete source is the VM (in pre-copy,
    # where QEMU can resume the source); only the destination's QEMU was killed.
    healthy_source = run.mode == "precopy" and run.fault == "kill-destination-qemu"
    if (
        healthy_source
        and not _ran(events, DESTINATION)
        and (vm.status, vm.host)
        != (
            vm_pb2.VM_STATUS_RUNNING,
            SOURCE,
        )
    ):
        failures.append("destination never ran, yet the VM does not run on the source")
    run.timeline = timeline(events)
    violations = InvariantChecker().check_quiescent(events)
    failures += [f"invariant {v.invariant} at seq {v.seq}: {v.message}" for v in violations]
    audit = subprocess.run(
        [str(BIN / "whimbrel-audit"), "verify", str(cluster.db), "--final"],
        capture_output=True,
        text=True,
        check=False,
    )
    if audit.returncode != 0:
        failures.append(f"whimbrel-audit verify --final exited {audit.returncode}: "
                        + audit.stdout.strip().replace("\n", " | ")[-400:])  # fmt: skip
    return failures


def _ran(events: Sequence[Event], host: str) -> bool:
    """Whether `host`'s QEMU reported the guest running during the migration."""
    requested = next(e.seq for e in events if isinstance(e.payload, events_pb2.MigrationRequested))
    return any(
        e.seq > requested
        and isinstance(e.payload, events_pb2.QmpEventReceived)
        and e.origin_host == host
        and e.payload.event == "RESUME"
        for e in events
    )


def timeline(events: Sequence[Event]) -> list[str]:
    """The switchover as the log tells it, one short line per event that matters, with
    milliseconds since the source's STOP: for reading a failed run without opening its log."""
    stop = next((e.time_us for e in events if isinstance(e.payload, events_pb2.QmpEventReceived)
                 and e.origin_host == SOURCE and e.payload.event == "STOP"), 0)  # fmt: skip
    lines = []
    for e in events:
        p = e.payload
        if isinstance(p, events_pb2.QmpEventReceived):
            if p.event not in ("STOP", "RESUME", "MIGRATION"):
                continue
            what = p.event + (f" {json.loads(p.data_json).get('status')}"
                              if p.event == "MIGRATION" else "")  # fmt: skip
        elif isinstance(p, events_pb2.CommandIssued):
            what = f"issued {events_pb2.CommandKind.Name(p.kind)[13:]} -> {p.host_id}"
        elif isinstance(p, events_pb2.CommandSucceeded | events_pb2.CommandFailed):
            error = f" {p.error!r}" if isinstance(p, events_pb2.CommandFailed) else ""
            what = f"{e.type} {events_pb2.CommandKind.Name(p.kind)[13:]}{error}"
        elif isinstance(p, events_pb2.LeaseReleased | events_pb2.LeaseAcquired):
            what = f"{e.type} {p.holder} gen {p.generation}"
        elif e.type in ("QemuExited", "FencingDecided", "VmLost", "RollbackDecided",
                        "MigrationFinished", "CoordinatorStarted", "HostConnected",
                        "HostDisconnected", "RecoveryStarted", "RecoveryFinished"):  # fmt: skip
            what = e.type + (f" {p.reason!r}" if hasattr(p, "reason") and p.reason else "")
        else:
            continue
        at = f"{(e.time_us - stop) / 1000:+.1f}ms" if stop and e.time_us else "?"
        lines.append(f"{e.seq} {at} {e.origin_host or 'coord'}: {what}")
    return lines


def _settle(cluster: Cluster, run: Run) -> None:
    """Check until every check holds twice in a row, QUIET_S apart, with nothing appended to
    the log in between (a run is judged settled, not at a passing instant: a QEMU killed just
    now may still be exiting), or until SETTLE_S is over."""
    deadline = time.monotonic() + SETTLE_S
    passed_at_head = -1
    while True:
        try:
            run.failures = _check(cluster, run)
            head = cluster.head()
        except grpc.RpcError as err:
            run.failures, head = [f"coordinator unreachable: {err.code().name}"], -1
        if run.failures:
            passed_at_head = -1
        elif head == passed_at_head or time.monotonic() > deadline:
            return
        else:
            passed_at_head = head
        if time.monotonic() > deadline:
            return
        time.sleep(QUIET_S)


def run_one(root: Path, run: Run, ram: Path) -> Run:
    """Run `run` in a fresh cluster under `root` and fill in what came of it."""
    started = time.monotonic()
    cluster = Cluster(root)
    # The guest's memory file is shared by every run, beside the runs' own directories.
    memory_root = ["--allow-disk-root", str(ram.parent)]
    cluster.hostd_args = {SOURCE: memory_root, DESTINATION: memory_root}
    run.dir = str(root)
    try:
        cluster.start(SOURCE, DESTINATION)
        cluster.define_and_start("vm-1", SOURCE, memory_mib=RAM_MIB, ram_file=ram)
        head = cluster.head()
        policy = events_pb2.MigrationPolicy(
            parameters=events_pb2.MigrationParameters(max_postcopy_bandwidth=POSTCOPY_BANDWIDTH)
        )
        cluster.migrations.StartMigration(migration_pb2.StartMigrationRequest(
            vm="vm-1", destination=DESTINATION, mode=MODES[run.mode], policy=policy,
            migration_id="m-1"))  # fmt: skip
        seen = cluster.wait_event(_trigger(run.trigger), timeout=60, from_seq=head)
        if not isinstance(seen.payload, events_pb2.MigrationFinished):
            run.triggered = True
            time.sleep(run.delay_ms / 1000)
            run.fault_after_ms = round(time.time() * 1000 - seen.time_us / 1000, 1)
            _strike(cluster, run)
        _settle(cluster, run)
    except Exception as err:  # a drill reports every way a run can go wrong
        run.failures.append(f"drill error: {err!r}")
    finally:
        cluster.teardown()
        run.duration_s = round(time.monotonic() - started, 1)
    return run


def run_batch(
    root: Path, seed: int, runs: int, first: int = 0, keep: bool = False,
    report: Callable[[Run], None] | None = None,
) -> list[Run]:  # fmt: skip
    """Runs first .. first+runs-1 of `seed`, each in root/run-NNNN (removed when it passed,
    unless `keep`)."""
    ram = random_ram(root / f"ram-{RAM_MIB}.bin", RAM_MIB)
    results = []
    for index in range(first, first + runs):
        directory = root / f"run-{index:04d}"
        run = run_one(directory, plan(seed, index), ram)
        if not run.failures and not keep:
            shutil.rmtree(directory, ignore_errors=True)
            run.dir = ""
        results.append(run)
        if report is not None:
            report(run)
    return results


def table(results: Sequence[Run]) -> str:
    """fault x mode x outcome, with counts; failed runs are counted under FAILED too."""
    counts: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for run in results:
        cell = counts[(run.fault, run.mode)]
        cell[run.outcome] += 1
        if run.failures:
            cell["FAILED"] += 1
    lines = [f"{'fault':<24} {'mode':<9} {'runs':>4}  outcomes"]
    for (fault, mode), cell in sorted(
        counts.items(), key=lambda kv: (FAULTS.index(kv[0][0]), kv[0][1])
    ):
        total = sum(n for outcome, n in cell.items() if outcome != "FAILED")
        outcomes = ", ".join(f"{outcome} {n}" for outcome, n in sorted(cell.items()))
        lines.append(f"{fault:<24} {mode:<9} {total:>4}  {outcomes}")
    failed = sum(1 for run in results if run.failures)
    lines.append(f"total {len(results)} runs, {failed} failed a check")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.drill", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=36, help="how many runs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="seed (default %(default)s)")
    parser.add_argument("--first", type=int, default=0, help="index of the first run")
    parser.add_argument("--root", type=Path, help="where runs live (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep passed runs' directories too")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="whimbrel-drill-"))
    root.mkdir(parents=True, exist_ok=True)

    def report(run: Run) -> None:
        line = dict(asdict(run), outcome=run.outcome)
        if not run.failures and "qemu" not in run.fault:
            del line["timeline"]
        print(json.dumps(line, sort_keys=True), flush=True)

    results = run_batch(root, args.seed, args.runs, args.first, args.keep, report)
    print(table(results), flush=True)
    return 1 if any(run.failures for run in results) else 0


if __name__ == "__main__":
    sys.exit(main())
