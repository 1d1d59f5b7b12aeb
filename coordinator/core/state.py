"""Derived state: hosts, VMs and migrations as the log says they are.

Entities are mutable slots classes because replaying a million events cannot afford to copy a
record per event; only `evolve` writes them, and `decide` only reads them. `World.copy()` gives an
independent snapshot when one is needed (e.g. "state at seq N").
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

from whimbrel.protocol import kind_label
from whimbrel.v1 import common_pb2, events_pb2


class Kind(enum.IntEnum):
    """Command kinds; values equal `whimbrel.v1.CommandKind`."""

    START_VM = events_pb2.COMMAND_KIND_START_VM
    STOP_VM = events_pb2.COMMAND_KIND_STOP_VM
    PREPARE_INCOMING = events_pb2.COMMAND_KIND_PREPARE_INCOMING
    START_MIGRATION = events_pb2.COMMAND_KIND_START_MIGRATION
    START_POSTCOPY = events_pb2.COMMAND_KIND_START_POSTCOPY
    RELEASE_LEASE = events_pb2.COMMAND_KIND_RELEASE_LEASE
    ACQUIRE_LEASE = events_pb2.COMMAND_KIND_ACQUIRE_LEASE
    CONTINUE_SWITCHOVER = events_pb2.COMMAND_KIND_CONTINUE_SWITCHOVER
    ENABLE_NETWORK = events_pb2.COMMAND_KIND_ENABLE_NETWORK
    RESUME_VM = events_pb2.COMMAND_KIND_RESUME_VM
    ANNOUNCE = events_pb2.COMMAND_KIND_ANNOUNCE
    DESTROY_VM = events_pb2.COMMAND_KIND_DESTROY_VM
    CANCEL_MIGRATION = events_pb2.COMMAND_KIND_CANCEL_MIGRATION
    RECOVER_INCOMING = events_pb2.COMMAND_KIND_RECOVER_INCOMING
    RESUME_MIGRATION = events_pb2.COMMAND_KIND_RESUME_MIGRATION
    SET_MIGRATION_PARAMETERS = events_pb2.COMMAND_KIND_SET_MIGRATION_PARAMETERS
    PAUSE_MIGRATION = events_pb2.COMMAND_KIND_PAUSE_MIGRATION

    @property
    def label(self) -> str:
        return kind_label(self.value)


class Phase(enum.IntEnum):
    """Migration phases; values equal `whimbrel.v1.MigrationPhase`."""

    PREPARING = common_pb2.MIGRATION_PHASE_PREPARING
    TRANSFERRING = common_pb2.MIGRATION_PHASE_TRANSFERRING
    SWITCHOVER = common_pb2.MIGRATION_PHASE_SWITCHOVER
    HANDOFF = common_pb2.MIGRATION_PHASE_HANDOFF
    FINISHING = common_pb2.MIGRATION_PHASE_FINISHING
    POSTCOPY_PAUSED = common_pb2.MIGRATION_PHASE_POSTCOPY_PAUSED
    ROLLING_BACK = common_pb2.MIGRATION_PHASE_ROLLING_BACK
    COMPLETED = common_pb2.MIGRATION_PHASE_COMPLETED
    ROLLED_BACK = common_pb2.MIGRATION_PHASE_ROLLED_BACK
    FENCED = common_pb2.MIGRATION_PHASE_FENCED
    FENCING = common_pb2.MIGRATION_PHASE_FENCING
    QUEUED = common_pb2.MIGRATION_PHASE_QUEUED

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES

    @property
    def label(self) -> str:
        return self.name.lower()


TERMINAL_PHASES = frozenset({Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FENCED})
# The forward path from the source's stop to the destination running (FINISHING begins with
# the destination's cont issued, before QEMU has resumed it).
_SWITCHOVER_PHASES = frozenset({Phase.SWITCHOVER, Phase.HANDOFF, Phase.FINISHING})


class VmStatus(enum.IntEnum):
    """VM statuses; values equal `whimbrel.v1.VmStatus`."""

    STOPPED = 1
    STARTING = 2
    RUNNING = 3
    PAUSED = 4
    MIGRATING = 5
    LOST = 6
    STOPPING = 7


class CommandState(enum.Enum):
    ISSUED = "issued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Command:
    """One issued command (its CommandIssued message) and what became of it.

    A thin record around the message: replay creates one per command, so it stays small.
    """

    __slots__ = ("error", "issued", "issued_at_us", "rejected", "result", "state")

    def __init__(self, issued: events_pb2.CommandIssued, issued_at_us: int = 0) -> None:
        self.issued = issued
        self.issued_at_us = issued_at_us
        self.state = CommandState.ISSUED
        self.result: events_pb2.CommandResult | None = None
        self.error = ""
        # The host refused it without acting (CommandFailed.rejected): it certainly had no effect.
        self.rejected = False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Command) and (
            self.issued,
            self.state,
            self.result,
            self.error,
        ) == (other.issued, other.state, other.result, other.error)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Command({self.command_id!r}, {self.kind_name}@{self.host}, {self.state.value})"

    @property
    def command_id(self) -> str:
        return self.issued.command_id

    @property
    def kind(self) -> int:
        return self.issued.kind

    @property
    def host(self) -> str:
        return self.issued.host_id

    @property
    def vm(self) -> str:
        return self.issued.vm

    @property
    def attempt(self) -> int:
        return self.issued.attempt

    @property
    def migration_id(self) -> str:
        return self.issued.migration_id

    @property
    def args(self) -> events_pb2.CommandArgs:
        return self.issued.args

    @property
    def kind_name(self) -> str:
        return Kind(self.kind).label


def vm_command_id(vm: str, number: int, kind: Kind) -> str:
    """The id of the VM's `number`th command outside migrations: unique for ever, since the
    count only grows (a repeated id would get hostd's stored result without running)."""
    return f"vm/{vm}/{number}-{kind.label}"


@dataclass(slots=True)
class HostState:
    host_id: str
    generation: int = 0
    connected: bool = False
    migration_address: str = ""
    highest_epoch_seen: int = 0
    changed_at_us: int = 0
    # What it offers its VMs, as its hostd last reported (0: not reported).
    memory_mib: int = 0
    vcpus: int = 0
    # Out of placement: nothing is started on it or migrated to it.
    cordoned: bool = False
    cordon_reason: str = ""
    # The migrations of its latest drain.
    drain_migrations: tuple[str, ...] = ()


@dataclass(slots=True)
class VmState:
    spec: common_pb2.VmSpec
    status: VmStatus = VmStatus.STOPPED
    # The host holding the authoritative copy.
    host: str = ""
    lease_holder: str = ""
    # Highest lease generation issued or observed: a new holder always gets more.
    lease_generation: int = 0
    # The generation the holder holds (lease_generation may be higher: issued, not yet taken).
    lease_holder_generation: int = 0
    migration_id: str = ""
    lost_reason: str = ""
    # host -> QEMU runstate last observed there ("running", "paused", "inmigrate", ...); a host
    # is absent once its QEMU for this VM exited.
    runstates: dict[str, str] = field(default_factory=dict)
    # Commands outside migrations (start, stop), by id, while unanswered.
    commands: dict[str, Command] = field(default_factory=dict)
    # How many commands outside migrations were ever issued for this VM (their ids count up).
    commands_issued: int = 0
    # A rollback left the VM paused at home only because its destination held the lease: once
    # the lease is free again (the stray copy destroyed) the VM takes it back and runs.
    resume_owed: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def running_hosts(self) -> list[str]:
        return sorted(h for h, rs in self.runstates.items() if rs == "running")


@dataclass(slots=True)
class Side:
    """What is known of one end's QEMU during a migration."""

    host: str
    # QEMU migration status ("active", "pre-switchover", "postcopy-active", "completed", ...).
    status: str = ""
    # When it reported that status (its host's clock): how long an end has waited in it.
    status_at_us: int = 0
    runstate: str = ""
    alive: bool = False
    stopped_at_us: int = 0
    resumed_at_us: int = 0
    # Why its migration failed, in QEMU's words (query-migrate's error-desc), if it said.
    error: str = ""
    # Cancelled while its post-copy was paused: QEMU (7.2) stays in `cancelling` for good.
    cancel_stuck: bool = False
    # When its host last queried it for a snapshot (query-status, query-migrate): QMP events
    # stamped earlier, delivered after (a hostd that was stalled), are history it already holds.
    snapshot_us: int = 0


@dataclass(slots=True)
class Progress:
    pass_: int = 0
    total_bytes: int = 0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    mbps: float = 0.0
    dirty_pages_rate: int = 0
    # The pass of the latest stats sample, and the remaining bytes of the sample before it.
    sampled_pass: int = 0
    previous_remaining_bytes: int = 0
    # The fewest bytes ever left at a sample, and the pass of that sample: a pre-copy that
    # finds no new minimum for some passes is not converging (the policy's stall_passes).
    min_remaining_bytes: int = 0
    min_at_pass: int = 0
    # When the first sample was taken, when one last showed more bytes sent than the one
    # before, and when the latest was taken (all by the source host's clock): samples that
    # show nothing sent for the policy's progress_timeout_s tell of a stuck source (no
    # samples tell nothing).
    watched_since_us: int = 0
    moved_at_us: int = 0
    sampled_at_us: int = 0

    def start_pass(self, n: int, remaining: int) -> None:
        """A sample of a new pass `n`: where the previous one ended becomes the yardstick of
        convergence, and a new minimum of remaining bytes is noted."""
        self.previous_remaining_bytes = self.remaining_bytes
        self.sampled_pass = n
        if not self.min_at_pass or remaining < self.min_remaining_bytes:
            self.min_remaining_bytes, self.min_at_pass = remaining, n


@dataclass(slots=True)
class MigrationState:
    migration_id: str
    vm: str
    src: Side
    dst: Side
    mode: int
    policy: events_pb2.MigrationPolicy
    source_was_running: bool
    source_lease_generation: int
    requested_at_us: int
    phase: Phase = Phase.PREPARING
    # The seq of its MigrationRequested: its place in the queue of migrations waiting to start.
    requested_seq: int = 0
    # When the current phase was entered (the time of the event that entered it).
    phase_since_us: int = 0
    attempt: int = 1
    reason: str = ""
    finished_at_us: int = 0
    last_seq: int = 0
    commands: dict[str, Command] = field(default_factory=dict)
    # (kind, host) -> the latest command of that kind on that host, any attempt.
    latest: dict[tuple[int, str], Command] = field(default_factory=dict)
    incoming_uri: str = ""
    postcopy_requested: bool = False
    postcopy_started: bool = False
    src_lease_released: bool = False
    src_lease_reacquired: bool = False
    dst_lease_generation: int = 0
    dst_network_enabled: bool = False
    # The cont intent for the destination is logged: the point of no return.
    cont_issued: bool = False
    dst_resumed: bool = False
    fencing_hosts: tuple[str, ...] = ()
    recovery_attempts: int = 0
    # The source went back to postcopy-paused after trying to resume (the link is still down).
    recovery_failed: bool = False
    # The attempt during which the source last entered postcopy-recover (a resume took).
    src_recover_attempt: int = 0
    progress: Progress = field(default_factory=Progress)
    # QEMU's migration parameters in force: the policy's, then as START_MIGRATION sent them,
    # then as tuned (MigrationTuned: an operator's bandwidth, a policy's downtime step).
    parameters: events_pb2.MigrationParameters = field(
        default_factory=events_pb2.MigrationParameters
    )

    @property
    def source(self) -> str:
        return self.src.host

    @property
    def destination(self) -> str:
        return self.dst.host

    @property
    def point_of_no_return_passed(self) -> bool:
        return self.cont_issued

    @property
    def in_switchover(self) -> bool:
        """Whether the guest is in its switchover pause, or about to be, with the coordinator
        on the critical path: from the switch to post-copy being requested (QEMU stops the
        source within a pass) or the source's stop, until the destination is seen running.
        Every step in between waits on the coordinator: a host's report folded and committed,
        the next command (lease, network, the destination's cont) written to a host."""
        if self.dst_resumed:
            return False
        if self.phase in _SWITCHOVER_PHASES:
            return True
        return self.phase == Phase.TRANSFERRING and self.postcopy_requested

    @property
    def postcopy_switch_sent(self) -> bool:
        """Whether migrate-start-postcopy went to the source's QEMU, or may have: a
        START_POSTCOPY, or a START_MIGRATION that carried the switch (post-copy asked for
        before the transfer: mode postcopy, or an operator's early switch)."""
        if self.cmd(Kind.START_POSTCOPY, self.source) is not None:
            return True
        start = self.cmd(Kind.START_MIGRATION, self.source)
        return start is not None and start.issued.args.start_postcopy

    @property
    def postcopy_allowed(self) -> bool:
        return self.mode != common_pb2.MIGRATION_MODE_PRECOPY

    @property
    def pause_us(self) -> int:
        """Guest-visible pause: destination RESUME minus source STOP, by QEMU's clocks."""
        if self.src.stopped_at_us and self.dst.resumed_at_us:
            return self.dst.resumed_at_us - self.src.stopped_at_us
        return 0

    def cmd(self, kind: int, host: str, *, this_attempt: bool = False) -> Command | None:
        """The latest command of `kind` on `host`, optionally only if of the current attempt."""
        command = self.latest.get((kind, host))
        if command is None or (this_attempt and command.attempt != self.attempt):
            return None
        return command

    def side(self, host: str) -> Side | None:
        if host == self.src.host:
            return self.src
        if host == self.dst.host:
            return self.dst
        return None


@dataclass(slots=True)
class World:
    """Everything the log says, folded."""

    epoch: int = 0
    last_seq: int = 0
    hosts: dict[str, HostState] = field(default_factory=dict)
    vms: dict[str, VmState] = field(default_factory=dict)
    migrations: dict[str, MigrationState] = field(default_factory=dict)
    open_migrations: set[str] = field(default_factory=set)
    # Recovery after a restart: hosts whose hello is awaited (no migration of theirs is decided
    # until it arrives or the bound expires), then hosts that missed the bound (their
    # migrations follow the recovery table until they return).
    awaited_hosts: set[str] = field(default_factory=set)
    missing_hosts: set[str] = field(default_factory=set)
    # The migration limits an operator set (None: the defaults, `scheduling.DEFAULT_LIMITS`).
    migration_limits: common_pb2.MigrationLimits | None = None
    # Bumped by every event that may let a queued migration start (a migration requested or
    # ended, new limits, a host connected): the shell re-judges the queue only then.
    queue_changes: int = 0
    # Stored convergence policies by name, as given, and the cluster default's name ("": none).
    policies: dict[str, events_pb2.MigrationPolicy] = field(default_factory=dict)
    default_policy: str = ""

    def copy(self) -> World:
        return copy.deepcopy(self)

    def switching_over(self) -> bool:
        """Whether some open migration is in its switchover (`MigrationState.in_switchover`)."""
        migrations = self.migrations
        return any(migrations[m].in_switchover for m in self.open_migrations)

    def qemus_believed_on(self, host: str) -> set[str]:
        """VMs the log says have a QEMU on `host`: a runstate observed there, or a side of an
        open migration on it that is alive."""
        names = {vm.name for vm in self.vms.values() if host in vm.runstates}
        for migration_id in self.open_migrations:
            m = self.migrations[migration_id]
            side = m.side(host)
            if side is not None and side.alive:
                names.add(m.vm)
        return names

    def command(self, command_id: str, vm: str) -> Command | None:
        """The command `command_id` (issued for VM `vm`), while the state still keeps it: a
        VM's own commands until answered, a migration's until it finishes. VM commands are
        looked up by VM, so a migration id that reads like their prefix is no special case."""
        owner = self.vms.get(vm)
        if owner is not None and command_id in owner.commands:
            return owner.commands[command_id]
        m = self.migrations.get(command_id.partition("/")[0])
        return m.commands.get(command_id) if m is not None else None
