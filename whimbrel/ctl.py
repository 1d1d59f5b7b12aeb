"""whimbrelctl: the operator's command line for a Whimbrel coordinator.

    whimbrelctl [--coordinator HOST:PORT] [--json] [--timeout SECONDS]
                [--tls-cert FILE --tls-key FILE --tls-ca FILE] COMMAND ...

Exit codes: 0 success, 1 the coordinator refused (the gRPC status is printed), 2 usage error,
3 coordinator unreachable (or no answer within --timeout), 4 a waited-for migration ended other
than completed. With --json, a refusal and an unreachable coordinator both print
{"error": {"code": STATUS, "message": TEXT}}.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from whimbrel import protocol, tls, validate
from whimbrel.v1 import (
    common_pb2,
    eventlog_pb2,
    eventlog_pb2_grpc,
    events_pb2,
    host_pb2,
    host_pb2_grpc,
    migration_pb2,
    migration_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_NOT_COMPLETED = 1, 2, 3, 4
MODES = {
    "precopy": common_pb2.MIGRATION_MODE_PRECOPY,
    "postcopy": common_pb2.MIGRATION_MODE_POSTCOPY,
    "auto": common_pb2.MIGRATION_MODE_AUTO,
}
TERMINAL = {
    common_pb2.MIGRATION_PHASE_COMPLETED,
    common_pb2.MIGRATION_PHASE_ROLLED_BACK,
    common_pb2.MIGRATION_PHASE_FENCED,
}


def _phase(value: int) -> str:
    return common_pb2.MigrationPhase.Name(value).removeprefix("MIGRATION_PHASE_").lower()  # type: ignore[arg-type]


def _status(value: int) -> str:
    return vm_pb2.VmStatus.Name(value).removeprefix("VM_STATUS_").lower()  # type: ignore[arg-type]


def _mode(value: int) -> str:
    return common_pb2.MigrationMode.Name(value).removeprefix("MIGRATION_MODE_").lower()  # type: ignore[arg-type]


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


class Refused(Exception):
    """whimbrelctl's own refusal, before it asked the coordinator to change anything: exit 1."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(Exception):
    """The coordinator did not answer in time: exit 3."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """A call's details with another timeout (gRPC's examples build them this way)."""


class _Deadline(grpc.UnaryUnaryClientInterceptor):
    """Every unary call gets the deadline: a stopped or hung coordinator accepts connections
    (the kernel does) but never answers, and a call without one waits forever."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.timeout is None:
            details = _CallDetails(
                details.method, self.timeout, details.metadata, details.credentials,
                details.wait_for_ready, details.compression,
            )  # fmt: skip
        return continuation(details, request)


class Ctl:
    def __init__(
        self,
        address: str,
        as_json: bool,
        tls_files: tls.TlsFiles | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.channel = tls.channel(address, tls_files)
        self.as_json = as_json
        self.address, self.timeout = address, timeout
        calls = grpc.intercept_channel(self.channel, _Deadline(timeout))
        self.migrations = migration_pb2_grpc.MigrationServiceStub(calls)
        self.vms = vm_pb2_grpc.VmServiceStub(calls)
        self.hosts = host_pb2_grpc.HostServiceStub(calls)
        self.log = eventlog_pb2_grpc.EventLogServiceStub(calls)

    def connect(self) -> None:
        """Before a stream that may rightly stay quiet for long (watch, --wait, --follow): the
        deadline applies to connecting only, which a stopped coordinator never completes."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError:
            message = f"cannot reach the coordinator at {self.address} within {self.timeout:g} s"
            raise Unreachable(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None

    def emit(self, message: Message, text: Callable[[Any], str]) -> None:
        if self.as_json:
            print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None))
        else:
            print(text(message))

    # --- hosts and VMs ---

    def hosts_list(self, ns: argparse.Namespace) -> int:
        reply = self.hosts.ListHosts(host_pb2.ListHostsRequest())

        def table(r: host_pb2.ListHostsResponse) -> str:
            lines = [
                f"{'HOST':<16} {'GEN':>4} {'STATE':<13} {'MIGRATION ADDR':<16} "
                f"{'FREE MIB/VCPUS':<20} VMS"
            ]
            for h in r.hosts:
                state = "connected" if h.connected else "disconnected"
                if h.cordoned:
                    state += ",cordoned"
                free = (
                    f"{h.free.memory_mib}/{h.capacity.memory_mib} {h.free.vcpus}/{h.capacity.vcpus}"
                )
                lines.append(
                    f"{h.host_id:<16} {h.generation:>4} {state:<13} "
                    f"{h.migration_address:<16} {free:<20} {','.join(h.vms)}"
                )
            return "\n".join(lines)

        self.emit(reply, table)
        return 0

    def host_cordon(self, ns: argparse.Namespace) -> int:
        request = host_pb2.CordonHostRequest(host_id=ns.host, reason=ns.reason or "")
        self.emit(self.hosts.CordonHost(request), _host_line)
        return 0

    def host_uncordon(self, ns: argparse.Namespace) -> int:
        request = host_pb2.UncordonHostRequest(host_id=ns.host, reason=ns.reason or "")
        self.emit(self.hosts.UncordonHost(request), _host_line)
        return 0

    def host_drain(self, ns: argparse.Namespace) -> int:
        hosts: list[str] = list(dict.fromkeys(ns.hosts))
        reason = f"drain: {ns.reason}" if ns.reason else "drain"
        cordoned: list[str] = []
        plans: list[host_pb2.DrainHostResponse] = []
        try:
            if len(hosts) > 1:
                self._check_drainable(hosts)
                # All out of placement before any is planned: a drain never sends a VM to a
                # host that is about to be drained as well.
                for host in hosts:
                    self.hosts.CordonHost(host_pb2.CordonHostRequest(host_id=host, reason=reason))
                    cordoned.append(host)
            for host in hosts:
                request = host_pb2.DrainHostRequest(
                    host_id=host, reason=ns.reason or "", mode=MODES[ns.mode]
                )
                plan = self.hosts.DrainHost(request)
                self.emit(plan, _drain_plan)
                plans.append(plan)
        except grpc.RpcError:
            # Checked first, so only a race gets here: what was already done stays done.
            if cordoned:
                started = [plan.host.host_id for plan in plans]
                print(f"whimbrelctl: done before the refusal below: cordoned {', '.join(cordoned)}"
                      f"; drains started on {', '.join(started) or 'none'} (`host uncordon HOST`"
                      " puts a host back)", file=sys.stderr)  # fmt: skip
            raise
        if not ns.wait:
            return 0
        return self._drain_wait(plans)

    def _check_drainable(self, hosts: list[str]) -> None:
        """A drain of several hosts cordons them all first: each is checked as the coordinator
        will check it before any is changed, so a typo or a drain still open refuses it all."""
        known = {h.host_id: h for h in self.hosts.ListHosts(host_pb2.ListHostsRequest()).hosts}
        nothing_done = "no host was cordoned or drained"
        for host in hosts:
            if host not in known:
                raise Refused(grpc.StatusCode.NOT_FOUND, f"host {host!r} not found: {nothing_done}")
        open_ids = {m.migration_id for m in self._migrations(open_only=True).migrations}
        for host in hosts:
            still_open = [mid for mid in known[host].drain_migrations if mid in open_ids]
            if still_open:
                message = (f"cannot drain host {host}: it is draining ({', '.join(still_open)} "
                           f"open): {nothing_done}")  # fmt: skip
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, message)

    def _drain_wait(self, plans: list[host_pb2.DrainHostResponse]) -> int:
        """Progress once a second until every migration of the drains ended, then what is
        left on each host."""
        ids = {mid for plan in plans for mid in plan.migration_ids}
        hosts = ", ".join(plan.host.host_id for plan in plans)
        shown = ""
        while True:
            ms = self._migrations().migrations
            ours = [m for m in ms if m.migration_id in ids]
            line = _drain_progress(hosts, ours)
            if line != shown and not self.as_json:
                print(line, flush=True)
                shown = line
            if all(common_pb2.MigrationPhase.Name(m.phase) in _TERMINAL for m in ours):
                break
            time.sleep(1.0)
        now = {h.host_id: h for h in self.hosts.ListHosts(host_pb2.ListHostsRequest()).hosts}
        for plan in plans:
            host = plan.host.host_id
            mine = [m for m in ours if m.migration_id in set(plan.migration_ids)]
            result = host_pb2.DrainHostResponse(
                host=now[host], migration_ids=plan.migration_ids, not_moved=plan.not_moved
            )
            self.emit(result, lambda r, mine=mine: _drain_result(r, mine))  # type: ignore[misc]
        moved = all(m.phase == common_pb2.MIGRATION_PHASE_COMPLETED for m in ours)
        unmoved = any(plan.not_moved for plan in plans)
        return 0 if moved and not unmoved else EXIT_NOT_COMPLETED

    def vm_define(self, ns: argparse.Namespace) -> int:
        spec = common_pb2.VmSpec(
            name=ns.name, memory_mib=ns.memory, vcpus=ns.vcpus, machine=ns.machine
        )
        for disk in ns.disk or []:
            spec.disks.append(
                common_pb2.Disk(path=disk, format=ns.disk_format, interface=ns.disk_interface)
            )
        spec.kernel, spec.initrd, spec.append = ns.kernel or "", ns.initrd or "", ns.append or ""
        for nic in ns.nic or []:
            mac, _, bridge = nic.partition(",")
            spec.nics.append(common_pb2.Nic(mac=mac, bridge=bridge))
        if ns.memory_file:
            spec.memory_backing.kind = "file"
            spec.memory_backing.path = ns.memory_file
        self.emit(self.vms.DefineVm(vm_pb2.DefineVmRequest(spec=spec)), self._vm_line)
        return 0

    def _vm_line(self, vm: vm_pb2.Vm) -> str:
        extra = f" migration={vm.migration_id}" if vm.migration_id else ""
        extra += f" lost: {vm.lost_reason}" if vm.lost_reason else ""
        return (
            f"{vm.spec.name:<16} {_status(vm.status):<10} host={vm.host or '-'} "
            f"lease={vm.lease_holder or '-'}@{vm.lease_generation}{extra}"
        )

    def vm_start(self, ns: argparse.Namespace) -> int:
        self.emit(
            self.vms.StartVm(vm_pb2.StartVmRequest(name=ns.name, host=ns.host)), self._vm_line
        )
        return 0

    def vm_stop(self, ns: argparse.Namespace) -> int:
        self.emit(
            self.vms.StopVm(vm_pb2.StopVmRequest(name=ns.name, force=ns.force)), self._vm_line
        )
        return 0

    def vm_get(self, ns: argparse.Namespace) -> int:
        self.emit(self.vms.GetVm(vm_pb2.GetVmRequest(name=ns.name)), self._vm_line)
        return 0

    def vm_list(self, ns: argparse.Namespace) -> int:
        reply = vm_pb2.ListVmsResponse()
        request = vm_pb2.ListVmsRequest()
        while True:  # every page
            listed = self.vms.ListVms(request)
            reply.vms.extend(listed.vms)
            if not listed.next_page_token:
                break
            request.page_token = listed.next_page_token
        self.emit(reply, lambda r: "\n".join(self._vm_line(vm) for vm in r.vms) or "no VMs")
        return 0

    # --- migrations ---

    def _migration_line(self, m: migration_pb2.Migration) -> str:
        p = m.progress
        pct = f"{100 * p.transferred_bytes / p.total_bytes:5.1f}%" if p.total_bytes else "    -"
        line = (
            f"{m.migration_id} {m.vm} {m.source}->{m.destination} {_mode(m.mode)} "
            f"{_phase(m.phase)} pass={getattr(p, 'pass')} sent={_bytes(p.transferred_bytes)} "
            f"remaining={_bytes(p.remaining_bytes)} {p.mbps:.0f} Mbit/s {pct}"
        )
        if m.postcopy:
            line += " postcopy"
        if m.queue_position:
            line += f" queue#{m.queue_position} (waiting for {m.waiting_for})"
        if m.pause_us:
            line += f" pause={m.pause_us / 1000:.1f}ms"
        if m.reason:
            line += f" ({m.reason})"
        return line

    def migrate(self, ns: argparse.Namespace) -> int:
        policy = events_pb2.MigrationPolicy()
        if ns.bandwidth:
            policy.parameters.max_bandwidth = ns.bandwidth
        if ns.downtime_ms:
            policy.parameters.downtime_limit_ms = ns.downtime_ms
        if ns.postcopy_bandwidth:
            policy.parameters.max_postcopy_bandwidth = ns.postcopy_bandwidth
        m = self.migrations.StartMigration(
            migration_pb2.StartMigrationRequest(
                vm=ns.vm,
                destination=ns.to,
                mode=MODES[ns.mode],
                policy=policy,
                migration_id=ns.id or "",
                policy_name=ns.policy or "",
            )
        )
        if not ns.wait:
            self.emit(m, self._migration_line)
            return 0
        return self._watch(m.migration_id)

    def _watch(self, migration_id: str) -> int:
        last: migration_pb2.Migration | None = None
        shown = ""
        for last in self._stream(migration_id):
            line = self._migration_line(last)
            # Text mode shows what changed; JSON mode passes every update on.
            if self.as_json or line != shown:
                self.emit(last, self._migration_line)
                shown = line
        if last is None or last.phase != common_pb2.MIGRATION_PHASE_COMPLETED:
            return EXIT_NOT_COMPLETED
        return 0

    def _stream(self, migration_id: str) -> Iterator[migration_pb2.Migration]:
        self.connect()
        yield from self.migrations.WatchMigration(
            migration_pb2.WatchMigrationRequest(migration_id=migration_id)
        )

    def migration_get(self, ns: argparse.Namespace) -> int:
        request = migration_pb2.GetMigrationRequest(migration_id=ns.id)
        self.emit(self.migrations.GetMigration(request), self._migration_line)
        return 0

    def migration_list(self, ns: argparse.Namespace) -> int:
        reply = self._migrations(vm=ns.vm or "", open_only=ns.open)
        self.emit(
            reply,
            lambda r: "\n".join(self._migration_line(m) for m in r.migrations) or "no migrations",
        )
        return 0

    def _migrations(
        self, vm: str = "", open_only: bool = False
    ) -> migration_pb2.ListMigrationsResponse:
        """ListMigrations, every page of it."""
        reply = migration_pb2.ListMigrationsResponse()
        request = migration_pb2.ListMigrationsRequest(vm=vm, open_only=open_only)
        while True:
            listed = self.migrations.ListMigrations(request)
            reply.migrations.extend(listed.migrations)
            if not listed.next_page_token:
                return reply
            request.page_token = listed.next_page_token

    def migration_watch(self, ns: argparse.Namespace) -> int:
        return self._watch(ns.id)

    def migration_abort(self, ns: argparse.Namespace) -> int:
        request = migration_pb2.AbortMigrationRequest(migration_id=ns.id, reason=ns.reason or "")
        self.emit(self.migrations.AbortMigration(request), self._migration_line)
        return 0

    def migration_postcopy(self, ns: argparse.Namespace) -> int:
        request = migration_pb2.SwitchToPostcopyRequest(migration_id=ns.id)
        self.emit(self.migrations.SwitchToPostcopy(request), self._migration_line)
        return 0

    def migration_set(self, ns: argparse.Namespace) -> int:
        request = migration_pb2.SetMigrationParametersRequest(
            migration_id=ns.id,
            max_bandwidth=ns.bandwidth or 0,
            max_postcopy_bandwidth=ns.postcopy_bandwidth or 0,
            reason=ns.reason or "",
        )
        self.emit(self.migrations.SetMigrationParameters(request), self._migration_line)
        return 0

    def migration_complete(self, ns: argparse.Namespace) -> int:
        request = migration_pb2.CompleteMigrationRequest(migration_id=ns.id, reason=ns.reason or "")
        self.emit(self.migrations.CompleteMigration(request), self._migration_line)
        return 0

    def policy_define(self, ns: argparse.Namespace) -> int:
        p = events_pb2.MigrationPolicy(
            downtime_steps_ms=ns.downtime_steps or [],
            stall_passes=ns.stall_passes or 0,
            on_stall=events_pb2.STALL_ACTION_ABORT
            if ns.on_stall == "abort"
            else events_pb2.STALL_ACTION_UNSPECIFIED,
            completion_timeout_s_per_gib=ns.timeout_per_gib or 0,
            progress_timeout_s=ns.progress_timeout or 0,
            max_downtime_ms=ns.max_downtime_ms or 0,
            auto_postcopy_max_passes=ns.postcopy_after_passes or 0,
        )
        params = p.parameters
        params.max_bandwidth = ns.bandwidth or 0
        params.downtime_limit_ms = ns.downtime_ms or 0
        params.max_postcopy_bandwidth = ns.postcopy_bandwidth or 0
        params.auto_converge = ns.auto_converge
        params.cpu_throttle_initial = ns.throttle_initial or 0
        params.cpu_throttle_increment = ns.throttle_increment or 0
        request = migration_pb2.DefinePolicyRequest(name=ns.name, policy=p, reason=ns.reason or "")
        self.emit(self.migrations.DefinePolicy(request), _policy_text)
        return 0

    def policy_list(self, ns: argparse.Namespace) -> int:
        reply = self.migrations.ListPolicies(migration_pb2.ListPoliciesRequest())
        self.emit(reply, _policies_text)
        return 0

    def policy_default(self, ns: argparse.Namespace) -> int:
        request = migration_pb2.SetDefaultPolicyRequest(
            name="" if ns.name == protocol.NO_POLICY else ns.name, reason=ns.reason or ""
        )
        self.emit(self.migrations.SetDefaultPolicy(request), _policies_text)
        return 0

    def limits_show(self, ns: argparse.Namespace) -> int:
        reply = self.migrations.GetMigrationLimits(migration_pb2.GetMigrationLimitsRequest())
        self.emit(reply, _limits_line)
        return 0

    def limits_set(self, ns: argparse.Namespace) -> int:
        current = self.migrations.GetMigrationLimits(migration_pb2.GetMigrationLimitsRequest())
        limits = common_pb2.MigrationLimits()
        limits.CopyFrom(current)
        for name in ("cluster", "per_host_outbound", "per_host_inbound"):
            value = getattr(ns, name)
            if value is not None:
                setattr(limits, name, value)
        request = migration_pb2.SetMigrationLimitsRequest(limits=limits, reason=ns.reason or "")
        self.emit(self.migrations.SetMigrationLimits(request), _limits_line)
        return 0

    # --- log ---

    def events(self, ns: argparse.Namespace) -> int:
        request = eventlog_pb2.ReadEventsRequest(
            from_seq=ns.since, follow=ns.follow, stream=ns.stream or "", limit=ns.limit
        )
        self.connect()
        for event in self.log.ReadEvents(request):
            self.emit(
                event,
                lambda e: (
                    f"{e.seq:>8} {e.stream:<24} {e.type:<24} "
                    f"{e.origin.host_id or 'coordinator'} "
                    f"{json_format.MessageToJson(e.payload, indent=None)}"
                ),
            )
        return 0

    def verify(self, ns: argparse.Namespace) -> int:
        reply = self.log.VerifyLog(eventlog_pb2.VerifyLogRequest())
        self.emit(
            reply,
            lambda r: (
                f"ok: {r.events_checked} events, head {r.head_seq} {r.head_hash}"
                if r.ok
                else f"VIOLATION at seq {r.first_bad_seq}: {r.problem}"
            ),
        )
        return 0 if reply.ok else EXIT_REFUSED


_TERMINAL = ("MIGRATION_PHASE_COMPLETED", "MIGRATION_PHASE_ROLLED_BACK", "MIGRATION_PHASE_FENCED")


def _host_line(h: host_pb2.Host) -> str:
    state = f"cordoned ({h.cordon_reason})" if h.cordoned else "in placement"
    return f"{h.host_id}: {state}; VMs: {', '.join(h.vms) or 'none'}"


def _drain_plan(r: host_pb2.DrainHostResponse) -> str:
    lines = [f"draining {r.host.host_id}: {len(r.migration_ids)} migrations"]
    lines += [f"  {mid}" for mid in r.migration_ids]
    lines += [f"  cannot move {n.vm}: {n.reason}" for n in r.not_moved]
    return "\n".join(lines)


def _drain_progress(host: str, ms: list[migration_pb2.Migration]) -> str:
    counts: dict[str, int] = {}
    for m in ms:
        counts[_phase(m.phase)] = counts.get(_phase(m.phase), 0) + 1
    parts = ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items()))
    return f"drain {host}: {parts or 'nothing to move'}"


def _drain_result(r: host_pb2.DrainHostResponse, ms: list[migration_pb2.Migration]) -> str:
    lines = []
    for m in sorted(ms, key=lambda m: m.vm):
        if m.phase == common_pb2.MIGRATION_PHASE_COMPLETED:
            lines.append(f"  {m.vm}: moved to {m.destination}")
        else:
            lines.append(f"  {m.vm}: not moved, {_phase(m.phase)} ({m.reason})")
    lines += [f"  {n.vm}: not moved ({n.reason})" for n in r.not_moved]
    left = list(r.host.vms)
    end = (
        f"{r.host.host_id} is empty"
        if not left
        else f"{r.host.host_id} still has {', '.join(left)}"
    )
    return "\n".join([*lines, end])


def _policy_text(p: migration_pb2.NamedPolicy) -> str:
    e = p.effective
    params = e.parameters
    parts = [
        f"bandwidth={_bytes(params.max_bandwidth) + '/s' if params.max_bandwidth else 'qemu'}",
        f"downtime={params.downtime_limit_ms}ms",
    ]
    if e.downtime_steps_ms:
        parts.append("steps=" + ",".join(str(d) for d in e.downtime_steps_ms))
    if params.auto_converge:
        parts.append(f"auto-converge({params.cpu_throttle_initial or 20}%+"
                     f"{params.cpu_throttle_increment or 10}%)")  # fmt: skip
    if e.stall_passes:
        action = "abort" if e.on_stall == events_pb2.STALL_ACTION_ABORT else "postcopy-or-abort"
        parts.append(f"stall={e.stall_passes}->{action}")
    if e.completion_timeout_s_per_gib:
        parts.append(f"timeout={e.completion_timeout_s_per_gib}s/GiB")
    if e.progress_timeout_s:
        parts.append(f"progress-timeout={e.progress_timeout_s}s")
    parts.append(f"max-downtime={e.max_downtime_ms or 2000}ms")
    return f"{p.name}: {' '.join(parts)}"


def _policies_text(r: migration_pb2.ListPoliciesResponse) -> str:
    lines = [_policy_text(p) for p in r.policies] or ["no policies"]
    lines.append(f"default: {r.default_name or 'built-in'}")
    return "\n".join(lines)


def _steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: milliseconds, comma-separated") from None
    if any(not 0 < step < 2**32 for step in steps):
        raise argparse.ArgumentTypeError(f"{text}: each step above 0 ms, below 2**32")
    return steps


def _limits_line(limits: common_pb2.MigrationLimits) -> str:
    def shown(n: int) -> str:
        return str(n) if n else "no limit"

    return (
        f"cluster={shown(limits.cluster)} per-host-outbound={shown(limits.per_host_outbound)} "
        f"per-host-inbound={shown(limits.per_host_inbound)}"
    )


def _whole(text: str, bits: int) -> int:
    """A whole number that fits the request's unsigned field of `bits` bits: out of range is a
    usage error (exit 2) rather than a traceback from protobuf."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**bits:
        raise argparse.ArgumentTypeError(f"{text}: a whole number from 0 to {2**bits - 1}")
    return value


def _u32(text: str) -> int:
    return _whole(text, 32)


def _u64(text: str) -> int:
    return _whole(text, 64)


def _count(text: str) -> int:
    """A limit: a whole number from 0 (no limit) up."""
    return _u32(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whimbrelctl", description="Operate a Whimbrel coordinator."
    )
    parser.add_argument(
        "--coordinator",
        default="127.0.0.1:7700",
        type=validate.coordinator_address,
        help="HOST:PORT (default %(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (one JSON object per line)"
    )
    parser.add_argument(
        "--timeout",
        type=validate.positive_seconds,
        default=5.0,
        help="give up after SECONDS without an answer, exit 3 (default %(default)g); streams "
        "(watch, --wait, --follow) apply it to connecting only",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("hosts", help="list hosts").set_defaults(run=Ctl.hosts_list)

    vm = sub.add_parser("vm", help="define, start, stop and list VMs").add_subparsers(
        dest="vm_command", required=True
    )
    define = vm.add_parser("define", help="define a VM")
    define.add_argument("name")
    define.add_argument("--memory", type=_u32, default=128, help="MiB (default %(default)s)")
    define.add_argument("--vcpus", type=_u32, default=1)
    define.add_argument("--machine", default="pc")
    define.add_argument(
        "--disk", action="append", help="absolute path on shared storage (repeatable)"
    )
    define.add_argument("--disk-format", default="raw", choices=["raw", "qcow2"])
    define.add_argument("--disk-interface", default="ide", choices=["ide", "virtio"])
    define.add_argument("--kernel", help="boot this kernel directly (absolute path on each host)")
    define.add_argument("--initrd", help="its initramfs (absolute path; needs --kernel)")
    define.add_argument("--append", help="its command line (needs --kernel)")
    define.add_argument("--nic", action="append", help="MAC[,BRIDGE] (repeatable)")
    define.add_argument("--memory-file", help="back RAM with this file (private mapping)")
    define.set_defaults(run=Ctl.vm_define)
    start = vm.add_parser("start", help="start a VM on a host")
    start.add_argument("name")
    start.add_argument("--host", required=True)
    start.set_defaults(run=Ctl.vm_start)
    stop = vm.add_parser("stop", help="stop a VM")
    stop.add_argument("name")
    stop.add_argument("--force", action="store_true")
    stop.set_defaults(run=Ctl.vm_stop)
    get = vm.add_parser("get", help="show a VM")
    get.add_argument("name")
    get.set_defaults(run=Ctl.vm_get)
    vm.add_parser("list", help="list VMs").set_defaults(run=Ctl.vm_list)

    migrate = sub.add_parser("migrate", help="migrate a running VM")
    migrate.add_argument("vm")
    migrate.add_argument("--to", required=True, help="destination host")
    migrate.add_argument("--mode", choices=sorted(MODES), default="precopy")
    migrate.add_argument("--wait", action="store_true", help="show live progress until it ends")
    migrate.add_argument("--id", help="migration id (generated when omitted)")
    migrate.add_argument("--bandwidth", type=_u64, help="max bandwidth, bytes/s")
    migrate.add_argument("--downtime-ms", type=_u64, help="downtime limit, ms")
    migrate.add_argument("--postcopy-bandwidth", type=_u64, help="max post-copy bandwidth, bytes/s")
    migrate.add_argument("--policy", help="a stored policy (default: the cluster's)")
    migrate.set_defaults(run=Ctl.migrate)

    host = sub.add_parser("host", help="host maintenance: cordon, uncordon, drain").add_subparsers(
        dest="host_command", required=True
    )
    for name, fn, help_ in (
        ("cordon", Ctl.host_cordon, "take a host out of placement (its VMs keep running)"),
        ("uncordon", Ctl.host_uncordon, "put a host back into placement"),
    ):
        p = host.add_parser(name, help=help_)
        p.add_argument("host")
        p.add_argument("--reason", help="why, recorded in the log")
        p.set_defaults(run=fn)
    drain = host.add_parser(
        "drain", help="cordon hosts and migrate every VM off them (all cordoned first)"
    )
    drain.add_argument("hosts", nargs="+", metavar="HOST")
    drain.add_argument("--reason", help="why, recorded in the log")
    drain.add_argument("--mode", choices=sorted(MODES), default="precopy")
    drain.add_argument(
        "--wait", action="store_true", help="show progress until it ends; exit 4 unless all moved"
    )
    drain.set_defaults(run=Ctl.host_drain)

    mig = sub.add_parser("migration", help="inspect and steer migrations").add_subparsers(
        dest="migration_command", required=True
    )
    simple = (
        ("get", Ctl.migration_get, "show one"),
        ("watch", Ctl.migration_watch, "follow one live"),
        ("postcopy", Ctl.migration_postcopy, "switch to post-copy"),
    )
    for name, fn, help_ in simple:
        p = mig.add_parser(name, help=help_)
        p.add_argument("id")
        p.set_defaults(run=fn)
    abort = mig.add_parser(
        "abort",
        help="roll back (refused once post-copy has begun or the destination was told to run)",
    )
    abort.add_argument("id")
    abort.add_argument("--reason")
    abort.set_defaults(run=Ctl.migration_abort)
    tune = mig.add_parser(
        "set",
        help="change a running migration's bandwidth (in post-copy: its post-copy bandwidth)",
    )
    tune.add_argument("id")
    tune.add_argument("--bandwidth", type=_u64, help="max bandwidth, bytes/s")
    tune.add_argument("--postcopy-bandwidth", type=_u64, help="max post-copy bandwidth, bytes/s")
    tune.add_argument("--reason", help="why, recorded in the log")
    tune.set_defaults(run=Ctl.migration_set)
    force = mig.add_parser(
        "complete", help="force-complete: post-copy if allowed, else the largest downtime"
    )
    force.add_argument("id")
    force.add_argument("--reason", help="why, recorded in the log")
    force.set_defaults(run=Ctl.migration_complete)
    lst = mig.add_parser("list", help="list migrations")
    lst.add_argument("--vm")
    lst.add_argument("--open", action="store_true", help="only non-terminal ones")
    lst.set_defaults(run=Ctl.migration_list)

    pol = sub.add_parser("policy", help="named convergence policies").add_subparsers(
        dest="policy_command", required=True
    )
    define = pol.add_parser("define", help="store a policy (unset values: the defaults)")
    define.add_argument("name")
    define.add_argument("--bandwidth", type=_u64, help="max bandwidth, bytes/s")
    define.add_argument("--downtime-ms", type=_u64, help="downtime limit at the start, ms")
    define.add_argument(
        "--downtime-steps", type=_steps, metavar="MS,MS,...",
        help="downtime limit from pass 2 on, one per pass (the last holds)",
    )  # fmt: skip
    define.add_argument("--max-downtime-ms", type=_u32, help="largest downtime (force-complete)")
    define.add_argument("--postcopy-bandwidth", type=_u64, help="max post-copy bandwidth, bytes/s")
    define.add_argument("--auto-converge", action="store_true", help="throttle a busy guest")
    define.add_argument("--throttle-initial", type=_u32, help="auto-converge first throttle, %%")
    define.add_argument("--throttle-increment", type=_u32, help="auto-converge step, %%")
    define.add_argument(
        "--stall-passes", type=_u32, help="passes without a new minimum of remaining bytes"
    )
    define.add_argument(
        "--on-stall", choices=["postcopy", "abort"], default="postcopy",
        help="after a stall or timeout: post-copy where the mode allows (else abort), or abort",
    )  # fmt: skip
    define.add_argument("--timeout-per-gib", type=_u32, help="pre-copy seconds per GiB of RAM")
    define.add_argument(
        "--progress-timeout", type=_u32, metavar="S",
        help="roll back once the source sent nothing for S seconds; in post-copy, pause both "
        "ends and recover the link (default 120)",
    )  # fmt: skip
    define.add_argument(
        "--postcopy-after-passes", type=_u32, help="mode auto: post-copy after this many passes"
    )
    define.add_argument("--reason", help="why, recorded in the log")
    define.set_defaults(run=Ctl.policy_define)
    pol.add_parser("list", help="stored policies and the default").set_defaults(run=Ctl.policy_list)
    default = pol.add_parser("default", help="set the cluster default ('none': built-in)")
    default.add_argument("name")
    default.add_argument("--reason", help="why, recorded in the log")
    default.set_defaults(run=Ctl.policy_default)

    limits = sub.add_parser(
        "limits", help="how many migrations run at once (more wait in a fair queue)"
    ).add_subparsers(dest="limits_command", required=True)
    limits.add_parser("show", help="the limits in force").set_defaults(run=Ctl.limits_show)
    set_limits = limits.add_parser("set", help="change limits (unnamed ones stay; 0: no limit)")
    set_limits.add_argument("--cluster", type=_count, help="migrations in the whole cluster")
    set_limits.add_argument(
        "--per-host-outbound", type=_count, help="migrations out of any one host"
    )
    set_limits.add_argument("--per-host-inbound", type=_count, help="migrations into any one host")
    set_limits.add_argument("--reason", help="why, recorded in the log")
    set_limits.set_defaults(run=Ctl.limits_set)

    events = sub.add_parser("events", help="read the event log")
    events.add_argument("--since", type=_u64, default=1)
    events.add_argument("--follow", action="store_true")
    events.add_argument("--stream")
    events.add_argument("--limit", type=_u64, default=0)
    events.set_defaults(run=Ctl.events)
    sub.add_parser("verify", help="verify the live log's hash chain").set_defaults(run=Ctl.verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    tls.add_tls_flags(parser)
    ns = parser.parse_args(argv)
    try:
        ctl = Ctl(ns.coordinator, ns.json, tls.tls_files(ns, parser), ns.timeout)
    except tls.TlsError as err:
        print(f"whimbrelctl: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(ns.run(ctl, ns))
    except Unreachable as err:
        return _failed(ns, err.code, str(err), EXIT_UNREACHABLE)
    except Refused as err:
        return _failed(ns, err.code, f"{err.code.name}: {err}", EXIT_REFUSED, str(err))
    except grpc.RpcError as err:
        code = err.code()
        details = err.details()
        answered = any(m.key == protocol.ANSWERED_KEY for m in err.trailing_metadata() or ())
        transport = not answered and "connect" in (details or "").lower()
        if code == grpc.StatusCode.UNAVAILABLE and transport:
            message = f"cannot reach the coordinator at {ns.coordinator}: {details}"
            return _failed(ns, code, message, EXIT_UNREACHABLE)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = (
                f"the coordinator at {ns.coordinator} did not answer within {ns.timeout:g} s "
                "(stopped, hung or overloaded? --timeout SECONDS waits longer)"
            )
            return _failed(ns, code, message, EXIT_UNREACHABLE)
        return _failed(ns, code, f"{code.name}: {details}", EXIT_REFUSED, details)
    except KeyboardInterrupt:
        return 130
    finally:
        ctl.channel.close()


def _failed(
    ns: argparse.Namespace,
    code: grpc.StatusCode,
    message: str,
    exit_code: int,
    details: str | None = None,
) -> int:
    """The same error object on stdout with --json, whatever went wrong; words on stderr."""
    if ns.json:
        text = message if details is None else details
        print(json.dumps({"error": {"code": code.name, "message": text}}))
    print(f"whimbrelctl: {message}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
