"""Inputs to `decide`: imperative requests from operators and the shell's "take the next step".

Every input carries `now_us`, the coordinator's clock reading, because the core reads no clock.
Operator requests carry the principal who made them, and the events recording them name it.
"""

from __future__ import annotations

from dataclasses import dataclass

from whimbrel.v1 import common_pb2, events_pb2


@dataclass(frozen=True, slots=True)
class DefineVm:
    spec: common_pb2.VmSpec
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class StartVm:
    name: str
    host: str
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class StopVm:
    name: str
    force: bool
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class StartMigration:
    migration_id: str
    vm: str
    destination: str
    mode: int
    policy: events_pb2.MigrationPolicy
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""
    # A stored policy to start from ("": the cluster default); `policy` overrides its fields.
    policy_name: str = ""


@dataclass(frozen=True, slots=True)
class AbortMigration:
    migration_id: str
    reason: str
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class SwitchToPostcopy:
    migration_id: str
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class SetMigrationLimits:
    limits: common_pb2.MigrationLimits
    reason: str
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class CordonHost:
    host: str
    cordoned: bool  # False: uncordon
    reason: str
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class DrainHost:
    host: str
    mode: int
    reason: str
    now_us: int
    # Who asked: the caller's certificate principal (empty without TLS), recorded in the log.
    principal: str = ""


@dataclass(frozen=True, slots=True)
class DefinePolicy:
    name: str
    policy: events_pb2.MigrationPolicy
    reason: str
    now_us: int
    principal: str = ""


@dataclass(frozen=True, slots=True)
class SetDefaultPolicy:
    name: str  # "": the built-in defaults
    reason: str
    now_us: int
    principal: str = ""


@dataclass(frozen=True, slots=True)
class TuneMigration:
    """An operator's change of a running migration's bandwidth (non-zero fields change)."""

    migration_id: str
    max_bandwidth: int
    max_postcopy_bandwidth: int
    reason: str
    now_us: int
    principal: str = ""


@dataclass(frozen=True, slots=True)
class CompleteMigration:
    """Force-complete: post-copy where allowed, else the policy's largest downtime limit."""

    migration_id: str
    reason: str
    now_us: int
    principal: str = ""


@dataclass(frozen=True, slots=True)
class Advance:
    """Take the next steps of one open migration from everything known about it."""

    migration_id: str
    now_us: int


@dataclass(frozen=True, slots=True)
class ReconcileVm:
    """Take the next step for a VM outside migrations: destroy stray copies, apply the lost-VM
    policy."""

    name: str
    now_us: int


Input = (
    DefineVm
    | StartVm
    | StopVm
    | StartMigration
    | AbortMigration
    | SwitchToPostcopy
    | SetMigrationLimits
    | CordonHost
    | DrainHost
    | DefinePolicy
    | SetDefaultPolicy
    | TuneMigration
    | CompleteMigration
    | Advance
    | ReconcileVm
)
