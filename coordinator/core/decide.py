"""decide(world, input) -> events: every decision the coordinator takes.

A VM's decisions outside migrations are in `vm_decisions`; a migration's whole life is in
`lifecycle`, which asks `convergence` what a pre-copy's policy decides; stored policies are in
`policies`, the migration limits and the queue in `scheduling`, cordons and drains in
`maintenance`. This module only routes each input to its decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.core import (
    convergence,
    lifecycle,
    maintenance,
    policies,
    scheduling,
    vm_decisions,
)
from coordinator.core import inputs as I
from coordinator.core.events import NewEvent
from coordinator.core.state import World


def decide(world: World, request: I.Input) -> list[NewEvent]:
    """The events that record the decision on `request` (empty: nothing to do)."""
    return _DECIDERS[type(request)](world, request)


_DECIDERS: dict[type, Callable[[World, Any], list[NewEvent]]] = {
    I.DefineVm: vm_decisions.define_vm,
    I.StartVm: vm_decisions.start_vm,
    I.StopVm: vm_decisions.stop_vm,
    I.ReconcileVm: vm_decisions.reconcile_vm,
    I.StartMigration: lifecycle.start_migration,
    I.AbortMigration: lifecycle.abort,
    I.SwitchToPostcopy: lifecycle.switch_to_postcopy,
    I.SetMigrationLimits: scheduling.set_limits,
    I.CordonHost: maintenance.cordon,
    I.DrainHost: maintenance.drain,
    I.DefinePolicy: policies.define,
    I.SetDefaultPolicy: policies.set_default,
    I.TuneMigration: convergence.tune,
    I.CompleteMigration: convergence.complete,
    I.Advance: lifecycle.advance,
}
