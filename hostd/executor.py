"""Executing coordinator commands on this host, one handler per command kind.

Each handler acts, reports the observations its actions cause (lease, network, exits) and
returns the command's result. Errors propagate as HostdError and become CommandFailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostd import migration_tls, qemu
from hostd.drivers.lease import LeaseDriver
from hostd.drivers.network import NetworkDriver
from hostd.errors import CommandRejected, HostdError, LeaseError, QemuMayRun
from hostd.guard import Guard, check_migration_uri, check_names
from hostd.migration_tls import MigrationTls
from hostd.vm import Emit, VmRuntime
from whimbrel import failpoints
from whimbrel.protocol import DISARMING, DISARMING_INCOMING
from whimbrel.v1 import common_pb2, events_pb2, host_pb2

log = logging.getLogger(__name__)
K = events_pb2
Handler = Callable[["Executor", host_pb2.Command], Awaitable[events_pb2.CommandResult]]
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
# How long a post-copy resume over TLS may take to get through its handshake.
RESUME_HANDSHAKE_LIMIT_S = 5.0


# QEMU 7.2's own values of the migration parameters the coordinator may set; a field it
# leaves 0 means this.
QEMU_DEFAULT_PARAMETERS = {
    "max-bandwidth": 128 << 20,
    "downtime-limit": 300,
    "max-postcopy-bandwidth": 0,  # no limit
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
}


def _qmp_parameters(p: events_pb2.MigrationParameters) -> dict[str, int]:
    """The parameters `p` sets (its non-zero fields), in QMP's names."""
    fields = {
        "max-bandwidth": p.max_bandwidth,
        "downtime-limit": p.downtime_limit_ms,
        "max-postcopy-bandwidth": p.max_postcopy_bandwidth,
        "cpu-throttle-initial": p.cpu_throttle_initial,
        "cpu-throttle-increment": p.cpu_throttle_increment,
    }
    return {name: value for name, value in fields.items() if value}


def free_port(address: str) -> int:
    """A TCP port free on `address` now (QEMU binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@dataclass
class Executor:
    host_id: str
    state_dir: Path
    migration_address: str
    lease: LeaseDriver
    network: NetworkDriver
    emit: Emit
    vms: dict[str, VmRuntime] = field(default_factory=dict)
    # VMs whose state this hostd could not read at its start (name -> why): a QEMU of theirs
    # may run, so no command touches them (a destroy that found "nothing here" would give up
    # the lease while it runs) until an operator repairs the state and restarts hostd.
    unreadable: dict[str, str] = field(default_factory=dict)
    # A fixed incoming port (0: a free one per migration), and the HOST[:PORT] sources are told
    # to connect to when it differs from where QEMU listens (NAT, a relay).
    migration_port: int = 0
    migration_advertise: str = ""
    # The network namespace QEMU runs in (its taps, their bridges and its migration traffic
    # with it); empty: hostd's own.
    netns: str = ""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # What this host allows commands to use (disks, bridges), and who QEMU runs as.
    guard: Guard = field(default_factory=Guard)
    qemu_user: str = ""
    # Migration streams over TLS (None: plaintext, as without TLS material).
    migration_tls: MigrationTls | None = None

    def _incoming(self) -> tuple[str, str]:
        """(URI the destination QEMU listens on, URI the source connects to)."""
        # (Probed in hostd's namespace: with --netns, a fixed --migration-port avoids a port
        # that happens to be taken in the VMs' namespace only.)
        port = self.migration_port or free_port(self.migration_address)
        listen = f"tcp:{self.migration_address}:{port}"
        if not self.migration_advertise:
            return listen, listen
        host, sep, advertised_port = self.migration_advertise.rpartition(":")
        if not sep:
            host, advertised_port = self.migration_advertise, str(port)
        return listen, f"tcp:{host}:{advertised_port}"

    async def run(self, command: host_pb2.Command) -> events_pb2.CommandResult:
        handler = _HANDLERS.get(command.kind)
        if handler is None:
            raise CommandRejected(f"unknown command kind {command.kind}", vm=command.vm)
        # Before anything acts: names become file names here and in the shared lockspace.
        check_names(command)
        if command.vm in self.unreadable:
            raise CommandRejected(
                f"the state of {command.vm} on {self.host_id} could not be read at hostd's start "
                f"({self.unreadable[command.vm]}); its QEMU may run: repair or remove "
                f"{self.state_dir / 'vms' / command.vm} and restart hostd",
                vm=command.vm,
            )
        runtime = self.vms.get(command.vm)
        if runtime is not None and command.kind in DISARMING:
            # The coordinator has changed course (a rollback takes the lease back before it
            # cancels) or moved on: a release at a later stop would take the lease from a
            # source that is about to run again.
            runtime.disarm_switchover()
        if runtime is not None and command.kind in DISARMING_INCOMING:
            runtime.at_incoming_postcopy = None  # this destination's QEMU is going away
        return await handler(self, command)

    def _vm(self, name: str) -> VmRuntime:
        runtime = self.vms.get(name)
        if runtime is None or runtime.exited.is_set():
            raise HostdError(f"no QEMU for {name} on {self.host_id}", vm=name)
        return runtime

    async def _network(self, phase: str, runtime: VmRuntime, state: int) -> None:
        async with runtime.network_lock:
            repeat = phase in ("enable", "release") and runtime.network_phase == phase
            if repeat and runtime.network_phase_reported == phase:
                return  # already (at the destination's postcopy-active, a repeat, an exit)
            if not repeat:
                await self.network.apply(phase, runtime.spec)
                runtime.save_network_phase(phase)
            # A repeat of a phase a previous hostd applied but died before reporting is
            # reported now: unreported, the coordinator waits for it for good.
            network_state = events_pb2.NetworkState.ValueType(state)
            await self.emit(events_pb2.NetworkChanged(vm=runtime.name, state=network_state), 0)
            runtime.network_phase_reported = phase

    def _checked(self, command: host_pb2.Command) -> common_pb2.VmSpec:
        """The command's spec with its files resolved, if this host allows all of it and no
        QEMU of the VM is here (one whose QMP is unreachable included)."""
        spec = command.args.spec
        incoming = command.kind == K.COMMAND_KIND_PREPARE_INCOMING
        resolved = self.guard.spec(spec, incoming=incoming)
        existing = self.vms.get(spec.name)
        if existing is not None and not existing.exited.is_set():
            raise HostdError(f"a QEMU for {spec.name} already runs here", vm=spec.name)
        return resolved

    async def _launch(
        self, command: host_pb2.Command, role: str, resolved: common_pb2.VmSpec
    ) -> VmRuntime:
        """Launch QEMU for `command`'s spec (`resolved`: as `_checked` returned it)."""
        spec = command.args.spec
        incoming = role == "destination"
        tls_dir = self.migration_tls.directory if self.migration_tls else None
        # The disks first: one refused leaves nothing of the VM behind on this host.
        with self._opened_disks(resolved) as disk_fds:
            runtime = VmRuntime(spec, self.state_dir / "vms" / spec.name, self.emit, role)
            runtime.save()
            args = qemu.command_line(
                resolved,
                runtime.paths,
                self.host_id,
                incoming=incoming,
                user=self.qemu_user,
                tls_dir=tls_dir,
                disk_fds=disk_fds,
            )
            if self.netns:
                args = ["ip", "netns", "exec", self.netns, *args]
            pid = await qemu.launch(args, runtime.paths, spec.name, pass_fds=disk_fds)
        self.vms[spec.name] = runtime
        try:
            await runtime.attach(pid)
        except BaseException:
            await runtime.kill("could not attach QMP after launch")
            raise
        self.release_network_at_exit(runtime)
        return runtime

    @contextlib.contextmanager
    def _opened_disks(self, resolved: common_pb2.VmSpec) -> Iterator[list[int]]:
        """The spec's disks opened for QEMU (Guard.open_disk), closed here once it has them."""
        fds: list[int] = []
        try:
            for disk in resolved.disks:
                fds.append(self.guard.open_disk(disk.path, resolved.name, disk.format))
            yield fds
        finally:
            for fd in fds:
                os.close(fd)

    def release_network_at_exit(self, runtime: VmRuntime) -> None:
        """Whatever ends a QEMU (a crash, a kill, a fence), the network hook hears it: a dead
        copy must not keep the VM's networking enabled where the VM no longer runs. Armed at
        launch, and again for the QEMUs a restarted hostd re-attaches to."""
        self._background(self._release_network_after(runtime))

    async def _release_network_after(self, runtime: VmRuntime) -> None:
        await runtime.exited.wait()
        await self.release_network_of_dead(runtime)

    async def release_network_of_dead(self, runtime: VmRuntime) -> None:
        """Run `release` for a QEMU that is gone, if its networking was ever set up."""
        if runtime.network_phase in ("prepare", "enable"):
            try:
                await self._network("release", runtime, K.NETWORK_STATE_RELEASED)
            except HostdError as err:
                log.error("%s: networking not released after QEMU exited: %s", runtime.name, err)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- VM lifecycle ---

    async def start_vm(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        vm = c.args.spec.name
        resolved = self._checked(c)
        lease = await self.lease.acquire(vm, self.host_id, c.args.lease_generation)
        await self.emit(K.LeaseAcquired(vm=vm, holder=self.host_id, generation=lease.generation), 0)
        try:
            runtime = await self._launch(c, role="", resolved=resolved)
            await self._network("prepare", runtime, K.NETWORK_STATE_PREPARED)
            await self._network("enable", runtime, K.NETWORK_STATE_ENABLED)
        except QemuMayRun:
            raise  # the lease stays here, where a QEMU of the VM may run: no host starts another
        except BaseException:
            await self._release_lease(vm)
            raise
        return K.CommandResult(pid=runtime.pid, lease_generation=lease.generation)

    async def stop_vm(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        runtime = self._vm(c.vm)
        if c.args.force:
            await runtime.kill(f"stopped by command {c.command_id}")
        else:
            await runtime.quit(f"stopped by command {c.command_id}")
        await self._teardown(runtime)
        return K.CommandResult()

    async def destroy_vm(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        runtime = self.vms.get(c.vm)
        if runtime is not None:
            await runtime.sample_before_destroy()
            await runtime.kill(f"killed by command {c.command_id} ({c.args.reason})")
            await self._teardown(runtime)
        else:
            # No QEMU here (already gone): still give up what the host holds for the VM.
            await self._release_lease(c.vm)
        return K.CommandResult()

    async def _teardown(self, runtime: VmRuntime) -> None:
        with contextlib.suppress(HostdError):
            await self._network("release", runtime, K.NETWORK_STATE_RELEASED)
        await self._release_lease(runtime.name)
        self.vms.pop(runtime.name, None)

    async def _release_lease(self, vm: str) -> None:
        released = await self.lease.release(vm, self.host_id)
        if released is not None:
            await self.emit(
                K.LeaseReleased(vm=vm, holder=self.host_id, generation=released.generation), 0
            )

    # --- migration ---

    async def prepare_incoming(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        runtime = await self._launch(c, role="destination", resolved=self._checked(c))
        try:
            capabilities = [
                {"capability": "events", "state": True},
                {"capability": "return-path", "state": True},
                # Block devices stay inactive until cont, after the source released its lease.
                {"capability": "late-block-activate", "state": True},
            ]
            if c.args.postcopy:
                capabilities.append({"capability": "postcopy-ram", "state": True})
            await runtime.execute("migrate-set-capabilities", {"capabilities": capabilities})
            await self._network("prepare", runtime, K.NETWORK_STATE_PREPARED)
            if c.args.enable_network_at_postcopy:
                self.enable_network_at_postcopy(runtime)
            if self.migration_tls is not None:
                for command, arguments in migration_tls.incoming_commands(c.args.peer_host):
                    await runtime.execute(command, arguments)
            listen, uri = self._incoming()
            check_migration_uri(uri, runtime.name)
            await runtime.execute("migrate-incoming", {"uri": listen})
        except BaseException:
            await runtime.kill("prepare failed")
            self.vms.pop(runtime.name, None)
            raise
        return K.CommandResult(uri=uri, pid=runtime.pid)

    async def start_migration(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        check_migration_uri(c.args.uri, c.vm)
        if c.args.start_postcopy and not c.args.postcopy:
            # QEMU would start the migration, then refuse the switch: refused before either.
            raise CommandRejected("start_postcopy without postcopy (postcopy-ram)", vm=c.vm)
        runtime = self._vm(c.vm)
        runtime.role = "source"
        runtime.save()
        # return-path: the source completes only once the destination has loaded the state,
        # so "completed" means loaded, not sent (a destination failing to load fails the
        # source's migration before its lease is given up).
        # Each capability and parameter is set either way: QEMU keeps them for the life of the
        # process, and a migration after one that was rolled back must not inherit its choices
        # (a post-copy start's throttled bandwidth, a pre-copy's pause-before-switchover).
        chosen = {
            "events": True,
            "return-path": True,
            # The source stops in pre-switchover so its lease moves before the switch completes.
            "pause-before-switchover": c.args.pause_before_switchover,
            "postcopy-ram": c.args.postcopy,
            # Throttles the guest's vCPUs while pre-copy does not converge (a capability: it
            # can be set only before the migration starts).
            "auto-converge": c.args.parameters.auto_converge,
        }
        capabilities = [{"capability": name, "state": on} for name, on in chosen.items()]
        await runtime.execute("migrate-set-capabilities", {"capabilities": capabilities})
        parameters = {**QEMU_DEFAULT_PARAMETERS, **_qmp_parameters(c.args.parameters)}
        await runtime.execute("migrate-set-parameters", parameters)
        await self._outgoing_tls(runtime, c.args.peer_host)
        runtime.disarm_switchover()
        if c.args.release_lease_at_switchover:
            self.arm_release_at_switchover(runtime)
        if c.args.continue_at_pre_switchover and c.args.pause_before_switchover:
            runtime.arm_continue_at_pre_switchover()
        # Not for a start that switches to post-copy at once: it never ends in the pre-copy
        # flush Nagle holds, and its switch measured ~2 ms slower with TCP_NODELAY.
        runtime.nodelay_for = "" if c.args.start_postcopy else c.args.uri
        if not c.args.start_postcopy:
            await runtime.execute("migrate", {"uri": c.args.uri})
            return K.CommandResult()
        # Both written before either answer is read: QEMU's monitor takes migrate-start-postcopy
        # right after migrate, while the outgoing connection is still being made, so the first
        # pass switches. Sent on migrate's answer, it lost to a mostly-zero guest whose first
        # pass ended first: with no bandwidth measured yet QEMU completes as soon as nothing is
        # pending, and the pause then takes the whole final sync.
        outcomes: list[object] = await asyncio.gather(
            runtime.execute("migrate", {"uri": c.args.uri}),
            runtime.execute("migrate-start-postcopy"),
            return_exceptions=True,
        )
        for outcome in outcomes:  # migrate's error first: the switch fails without a migration
            if isinstance(outcome, BaseException):
                raise outcome
        return K.CommandResult()

    async def _outgoing_tls(self, runtime: VmRuntime, peer: str) -> None:
        if self.migration_tls is not None:
            parameters = migration_tls.outgoing_parameters(peer)
            await runtime.execute("migrate-set-parameters", parameters)

    def arm_release_at_switchover(self, runtime: VmRuntime) -> None:
        runtime.arm_switchover(functools.partial(self._release_at_switchover, runtime.name))

    async def _release_at_switchover(self, vm: str) -> None:
        failpoints.hit("hostd.before-release-at-switchover")
        try:
            await self._release_lease(vm)
        except HostdError as err:
            log.error("%s: lease not released at the switchover (the coordinator's release "
                      "command follows): %s", vm, err)  # fmt: skip

    def enable_network_at_postcopy(self, runtime: VmRuntime) -> None:
        """Arm this destination: its networking is enabled when its QEMU reports
        postcopy-active, which it does only once the source has stopped."""
        runtime.at_incoming_postcopy = functools.partial(self._enable_at_postcopy, runtime)

    async def _enable_at_postcopy(self, runtime: VmRuntime) -> None:
        try:
            await self._network("enable", runtime, K.NETWORK_STATE_ENABLED)
        except HostdError as err:
            log.error("%s: networking not enabled at postcopy-active (the coordinator's enable "
                      "command follows): %s", runtime.name, err)  # fmt: skip

    async def set_parameters(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        parameters = _qmp_parameters(c.args.parameters)
        if parameters:
            await self._vm(c.vm).execute("migrate-set-parameters", parameters)
        return K.CommandResult()

    async def start_postcopy(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        await self._vm(c.vm).execute("migrate-start-postcopy")
        return K.CommandResult()

    async def continue_switchover(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        await self._vm(c.vm).execute("migrate-continue", {"state": "pre-switchover"})
        return K.CommandResult()

    async def cancel_migration(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        await self._vm(c.vm).execute("migrate_cancel")
        return K.CommandResult()

    async def pause_migration(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        # Out of band, as migrate-recover: on a destination the command is for exactly the
        # case where its main thread may be blocked on a page that never comes.
        await self._vm(c.vm).execute("migrate-pause", oob=True)
        return K.CommandResult()

    async def recover_incoming(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        listen, uri = self._incoming()
        check_migration_uri(uri, c.vm)
        # Out of band: a post-copy destination whose guest touched a page that never came
        # blocks QEMU's main thread until the link is back, and so would queue this command
        # behind that for good (QEMU allows migrate-recover out of band for this reason).
        # With migration TLS, the settings of PREPARE_INCOMING hold for the new stream too:
        # nothing in band may come first.
        await self._vm(c.vm).execute("migrate-recover", {"uri": listen}, oob=True)
        return K.CommandResult(uri=uri)

    async def resume_migration(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        uri = check_migration_uri(c.args.uri, c.vm)
        runtime = self._vm(c.vm)
        # The source's main thread is not blocked by a paused post-copy, unlike the
        # destination's: its TLS settings are set again, for the peer this command names.
        await self._outgoing_tls(runtime, c.args.peer_host)
        await runtime.execute("migrate", {"uri": uri, "resume": True})
        if self.migration_tls is not None:
            await self._until_resumed(runtime)
        return K.CommandResult()

    async def _until_resumed(self, runtime: VmRuntime) -> None:
        """Until the source has left postcopy-paused. Over TLS, QEMU 7.2 enters
        postcopy-recover only once the handshake is done, and a failed handshake (a link still
        down, a refused peer) leaves it in postcopy-paused without an event: without this, the
        coordinator would wait for good on a resume that already failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESUME_HANDSHAKE_LIMIT_S
        while True:
            status = (await runtime.query("query-migrate")).get("status", "")
            if status != "postcopy-paused":
                return
            if loop.time() > deadline:
                raise HostdError(
                    f"resume not under way after {RESUME_HANDSHAKE_LIMIT_S:g} s: still "
                    "postcopy-paused (the TLS handshake failed, or the link is down)",
                    vm=runtime.name,
                )
            await asyncio.sleep(0.05)

    # --- handoff ---

    async def release_lease(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        # Only the generation named: a late or forged release must not take a lease this host
        # has taken again since (a rollback's acquire).
        named = c.args.lease_generation
        released = await self.lease.release(c.vm, self.host_id, named)
        generation = released.generation if released is not None else 0
        if released is None and named:
            # Perhaps a repeat of a release that acted but whose report died with a previous
            # hostd: if this host holds none, the generation named (one handed out already)
            # is released. Unreported, the coordinator would wait for it for good (a rollback
            # taking the lease back).
            current = self.lease.read(c.vm)
            if current.holder != self.host_id and current.generation >= named:
                generation = named
        if generation:
            await self.emit(K.LeaseReleased(vm=c.vm, holder=self.host_id, generation=generation), 0)
        return K.CommandResult()

    async def acquire_lease(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        generation = c.args.lease_generation
        try:
            lease = await self.lease.acquire(c.vm, self.host_id, generation)
        except LeaseError:
            current = self.lease.read(c.vm)
            if current.holder != self.host_id or current.generation != generation:
                raise
            lease = current  # a repeat of the acquire that already took effect
        await self.emit(
            K.LeaseAcquired(vm=c.vm, holder=self.host_id, generation=lease.generation), 0
        )
        return K.CommandResult(lease_generation=lease.generation)

    async def enable_network(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        await self._network("enable", self._vm(c.vm), K.NETWORK_STATE_ENABLED)
        return K.CommandResult()

    def _holding_lease(self, c: host_pb2.Command) -> None:
        """A guest runs only where its lease is: this host must hold it, at the command's
        generation or later."""
        lease = self.lease.read(c.vm)
        if lease.holder != self.host_id or lease.generation < c.args.lease_generation:
            held = f"{lease.holder} at generation {lease.generation}" if lease.holder else "nobody"
            raise CommandRejected(
                f"refused cont: the lease of {c.vm} is held by {held}, not by {self.host_id}"
                + (f" at generation {c.args.lease_generation} or later"
                   if c.args.lease_generation else ""),
                vm=c.vm,
            )  # fmt: skip

    async def resume_vm(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        try:
            vm = self._vm(c.vm)
            self._holding_lease(c)
            if vm.role == "destination":
                # The handoff can be over before the destination has the state the source
                # sends once it stopped: its device state in post-copy, the last pages in
                # pre-copy. cont would come too early for QEMU (7.2) then: it first takes the
                # disks' locks, which the source gives up only after flushing them, so it can
                # fail; or it only arms autostart. The guest could not run before that state.
                await vm.until_source_state_here()
                self._holding_lease(c)  # still, after the wait
            if vm.exited.is_set() or (vm.pid and not qemu.can_still_act(vm.pid)):
                # A QEMU that exited or is being killed (even one whose migration had
                # completed) cannot run the guest: say so before writing to its socket, so the
                # coordinator knows cont never ran and may still fall back to the other side.
                raise CommandRejected(f"QEMU of {c.vm} has exited", vm=c.vm)
        except CommandRejected:
            raise
        except HostdError as err:
            # cont never reached QEMU, so the guest did not run here: the coordinator may
            # still fall back to a complete source (a CommandFailed marked rejected).
            raise CommandRejected(f"cont not sent: {err}", vm=c.vm) from err
        await vm.execute("cont")
        # QEMU may answer before the guest runs (autostart, while it still loads the state): the
        # command succeeds once it runs, so what follows it (announce-self) follows the start.
        await vm.until_running()
        return K.CommandResult()

    async def announce(self, c: host_pb2.Command) -> events_pb2.CommandResult:
        await self._vm(c.vm).execute("announce-self", ANNOUNCE)
        return K.CommandResult()


_HANDLERS: dict[int, Handler] = {
    K.COMMAND_KIND_START_VM: Executor.start_vm,
    K.COMMAND_KIND_STOP_VM: Executor.stop_vm,
    K.COMMAND_KIND_PREPARE_INCOMING: Executor.prepare_incoming,
    K.COMMAND_KIND_START_MIGRATION: Executor.start_migration,
    K.COMMAND_KIND_START_POSTCOPY: Executor.start_postcopy,
    K.COMMAND_KIND_RELEASE_LEASE: Executor.release_lease,
    K.COMMAND_KIND_ACQUIRE_LEASE: Executor.acquire_lease,
    K.COMMAND_KIND_CONTINUE_SWITCHOVER: Executor.continue_switchover,
    K.COMMAND_KIND_ENABLE_NETWORK: Executor.enable_network,
    K.COMMAND_KIND_RESUME_VM: Executor.resume_vm,
    K.COMMAND_KIND_ANNOUNCE: Executor.announce,
    K.COMMAND_KIND_DESTROY_VM: Executor.destroy_vm,
    K.COMMAND_KIND_CANCEL_MIGRATION: Executor.cancel_migration,
    K.COMMAND_KIND_RECOVER_INCOMING: Executor.recover_incoming,
    K.COMMAND_KIND_RESUME_MIGRATION: Executor.resume_migration,
    K.COMMAND_KIND_SET_MIGRATION_PARAMETERS: Executor.set_parameters,
    K.COMMAND_KIND_PAUSE_MIGRATION: Executor.pause_migration,
}
