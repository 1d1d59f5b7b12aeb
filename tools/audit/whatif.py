"""`whimbrel-audit whatif`: how a recorded migration would have gone under another policy.

The log holds, per pass of the source, what QEMU measured: the guest's dirty rate, the
throughput, and at the end the bytes sent. Those are the migration's environment: its dirty
rate per pass, and the throughput it achieved on average (bytes sent over transfer time).
The prediction runs them through qmpsim's pre-copy model (`whimbrel.precopy_model`) and, after
every pass, through the coordinator's own policy judgements (`coordinator.core.convergence`:
downtime steps, stalls, the completion timeout, mode auto's switch), so it decides as the
coordinator would have. The same prediction
under the recorded policy, set beside what happened, is the model's error.

Limits of the environment, said in the output: a recording capped by its own max-bandwidth
shows the cap, not what the link could carry; the dirty rate recorded under auto-converge is
already throttled; passes beyond the recording repeat its last dirty rate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from google.protobuf import json_format

from coordinator.core import Event, World, convergence, policies
from coordinator.core.invariants import qmp_data
from coordinator.core.lifecycle import POSTCOPY_MODE_DOWNTIME_LIMIT_MS
from coordinator.core.scheduling import counted
from coordinator.core.state import MigrationState, Side
from coordinator.core.validate import effective_policy
from whimbrel import precopy_model as model
from whimbrel.v1 import common_pb2, events_pb2

from .display import joined
from .logfile import fold

MAX_PASSES = 1000
# A sample taken while pre-copy still ran (hostd samples at each pass; the sync that converges
# is followed at once by the stop, so its sample may already read pre-switchover or device).
_TRANSFERRING = frozenset({"active", "pre-switchover", "device"})
_MODES: dict[int, str] = {
    common_pb2.MIGRATION_MODE_PRECOPY: "precopy",
    common_pb2.MIGRATION_MODE_POSTCOPY: "postcopy",
    common_pb2.MIGRATION_MODE_AUTO: "auto",
}
# The guest's pause at a post-copy switch, when the recording has none to go by: what the
# switchover bench measures for post-copy on these machines is of this order.
POSTCOPY_PAUSE_MS = 12.0


@dataclass
class Recorded:
    """A migration as the log tells it."""

    migration_id: str
    vm: str
    mode: str
    policy: str
    memory_mib: int
    passes: int
    total_s: float
    pause_ms: float
    postcopy: bool
    outcome: str
    link_bytes_s: float
    capped_at: float  # the recorded policy's max-bandwidth when the link ran at it, else 0
    dirty_bytes_s: list[float] = field(default_factory=list)
    # What the guest's pause held beyond QEMU's stop-and-copy (the lease and network handoff,
    # the cont): taken from the recording, and added to every predicted pre-copy pause.
    handoff_ms: float = 0.0


@dataclass
class Prediction:
    passes: int
    total_s: float
    pause_ms: float
    postcopy: bool
    outcome: str
    reason: str


def recorded(events: list[Event], migration_id: str) -> tuple[Recorded, MigrationState]:
    world = World()
    started_us = ended_us = first_active_us = 0
    passes = 0
    rates: dict[int, float] = {}
    sent, peak = 0, 0.0
    for event in events:
        fold(world, event)
        m = world.migrations.get(migration_id)
        if m is None:
            continue
        p = event.payload
        if (
            isinstance(p, events_pb2.CommandIssued)
            and p.kind == events_pb2.COMMAND_KIND_START_MIGRATION
            and p.migration_id == migration_id
            and not started_us
        ):
            started_us = event.time_us
        if event.origin_host != m.source or getattr(p, "vm", "") != m.vm:
            continue
        if isinstance(p, events_pb2.QmpEventReceived):
            data = qmp_data(p.data_json)
            if p.event == "MIGRATION_PASS":
                passes = max(passes, _count(data.get("pass")))
            elif p.event == "MIGRATION" and data.get("status") == "active":
                first_active_us = first_active_us or event.time_us
            elif p.event == "MIGRATION" and data.get("status") == "completed":
                ended_us = event.time_us
        elif isinstance(p, events_pb2.MigrationStatsSampled):
            sent = max(sent, p.transferred_bytes)
            if p.status in _TRANSFERRING and getattr(p, "pass"):  # (0: between passes)
                rates[getattr(p, "pass")] = p.dirty_pages_rate * model.PAGE
                peak = max(peak, p.mbps * 1e6 / 8)
    m = world.migrations.get(migration_id)
    if m is None:
        raise ValueError(f"no migration {migration_id!r} in the log")
    if not m.phase.terminal:
        raise ValueError(f"migration {migration_id} has not ended: nothing to compare with")
    if not rates:
        raise ValueError(f"migration {migration_id} has no pass samples to predict from")
    begin = first_active_us or started_us
    end = ended_us or m.finished_at_us
    cap = m.policy.parameters.max_bandwidth
    # What the migration achieved on average (a shared machine, a busy link carry less than
    # QEMU's momentary figure); QEMU's peak where the totals are missing.
    link = sent / ((end - begin) / 1e6) if sent and end > begin else peak
    return (
        Recorded(
            migration_id=migration_id,
            vm=m.vm,
            mode=_MODES.get(m.mode, "precopy"),
            policy=m.policy.name or "default",
            memory_mib=world.vms[m.vm].spec.memory_mib,
            passes=passes,
            total_s=max(0, end - begin) / 1e6,
            pause_ms=m.pause_us / 1000,
            postcopy=m.postcopy_started,
            outcome=m.phase.label,
            link_bytes_s=link,
            capped_at=float(cap) if cap and peak >= 0.9 * cap else 0.0,
            dirty_bytes_s=[rates[k] for k in sorted(rates)],
        ),
        m,
    )


def _count(value: object) -> int:
    """A pass number from QMP data: a number, or nothing."""
    return int(value) if isinstance(value, int | float) and 0 <= value < 2**63 else 0


def policy_from(world_events: list[Event], spec: str) -> events_pb2.MigrationPolicy:
    """A stored policy's name (as the log last defined it), or a JSON file of a
    MigrationPolicy; resolved as the coordinator resolves a migration's."""
    path = Path(spec)
    if path.is_file():
        parsed = json_format.Parse(path.read_text(), events_pb2.MigrationPolicy())
        return effective_policy(parsed)
    world = World()
    for event in world_events:
        if isinstance(event.payload, (events_pb2.PolicyDefined, events_pb2.DefaultPolicySet)):
            fold(world, event)
    return policies.resolve(world, spec, events_pb2.MigrationPolicy())


def predict(rec: Recorded, policy: events_pb2.MigrationPolicy, mode: int) -> Prediction:
    """Rounds of pre-copy on the recorded environment, the coordinator's judgements after
    each pass, until the switchover, post-copy, or a roll-back."""
    ram = float(rec.memory_mib << 20)
    link = rec.link_bytes_s
    params = policy.parameters
    m = MigrationState(
        rec.migration_id, rec.vm, Side("source"), Side("destination"), mode, policy,
        True, 1, 0,
    )  # fmt: skip
    m.parameters.CopyFrom(params)
    if mode == common_pb2.MIGRATION_MODE_POSTCOPY:
        # Mode postcopy switches at once; its pre-copy phase runs with a 1 ms limit.
        return _postcopy(ram, 0.0, ram, params, link, 2, "mode postcopy")
    throttle = model.Throttle(
        params.cpu_throttle_initial or model.THROTTLE_INITIAL,
        params.cpu_throttle_increment or model.THROTTLE_INCREMENT,
    )
    deadline_s = convergence.completion_deadline_s(policy, rec.memory_mib)
    elapsed, to_send, n = 0.0, ram, 1
    while n < MAX_PASSES:
        rate = model.bandwidth(params.max_bandwidth, link)
        round_s = to_send / rate
        if elapsed + round_s > deadline_s:
            # The coordinator's clock tick judges the timeout in the middle of a round.
            unsent = to_send - rate * (deadline_s - elapsed)
            gave_up = convergence.given_up_reason(m, rec.memory_mib, 0, int(deadline_s * 1e6) + 1)
            return _give_up(rec, policy, mode, ram, deadline_s, unsent, params, link, n, gave_up)
        elapsed += round_s
        if elapsed < model.FIRST_MEASURE_S:
            # (the stop-and-copy's own sync is a pass too, as QEMU counts them)
            return Prediction(n + 1, elapsed, rec.handoff_ms, False, "completed",
                              "converged in the first 100 ms")  # fmt: skip
        dirty_rate = throttle.rate(rec.dirty_bytes_s[min(n - 1, len(rec.dirty_bytes_s) - 1)])
        dirty = model.dirtied(dirty_rate, round_s, ram)
        if params.auto_converge:
            throttle.after_sync(dirty, to_send)
        n += 1
        downtime = m.parameters.downtime_limit_ms
        if mode == common_pb2.MIGRATION_MODE_POSTCOPY:
            downtime = POSTCOPY_MODE_DOWNTIME_LIMIT_MS
        if dirty <= model.threshold(rate, downtime):
            pause_ms = dirty / rate * 1000 + rec.handoff_ms
            return Prediction(n + 1, elapsed + dirty / rate, pause_ms, False, "completed",
                              f"converged at pass {n}")  # fmt: skip
        _record_pass(m, n, int(dirty))
        why = convergence.auto_postcopy_reason(m) if mode == common_pb2.MIGRATION_MODE_AUTO else ""
        gave_up = why or convergence.given_up_reason(m, rec.memory_mib, 0, int(elapsed * 1e6))
        if gave_up:
            return _give_up(rec, policy, mode, ram, elapsed, dirty, params, link, n, gave_up,
                            auto=bool(why))  # fmt: skip
        step = convergence.downtime_step(m)
        if step:
            m.parameters.downtime_limit_ms = step
        to_send = dirty
    return Prediction(n, elapsed, 0.0, False, "never converges", f"{MAX_PASSES} passes")


def _give_up(
    rec: Recorded,
    policy: events_pb2.MigrationPolicy,
    mode: int,
    ram: float,
    elapsed: float,
    left: float,
    params: events_pb2.MigrationParameters,
    link: float,
    n: int,
    why: str,
    *,
    auto: bool = False,
) -> Prediction:
    """Post-copy where the mode allows it (and, but for mode auto's own switch, on_stall does
    not say abort), else a roll-back."""
    allowed = mode != common_pb2.MIGRATION_MODE_PRECOPY
    if allowed and (auto or policy.on_stall != events_pb2.STALL_ACTION_ABORT):
        return _postcopy(ram, elapsed, left, params, link, n + 1, why)
    return Prediction(n, elapsed, 0.0, False, "rolled back", why)


def _record_pass(m: MigrationState, n: int, remaining: int) -> None:
    """What the coordinator folds from a pass and its sample (evolve's `_stats`)."""
    m.progress.start_pass(n, remaining)
    m.progress.pass_, m.progress.remaining_bytes = n, remaining


def _postcopy(
    ram: float,
    elapsed: float,
    left: float,
    params: events_pb2.MigrationParameters,
    link: float,
    n: int,
    why: str,
) -> Prediction:
    rate = model.bandwidth(params.max_postcopy_bandwidth, link)
    return Prediction(n, elapsed + min(ram, left) / rate, POSTCOPY_PAUSE_MS, True, "completed",
                      f"post-copy after {why}")  # fmt: skip


@dataclass
class WhatIf:
    recorded: Recorded
    model: Prediction  # under the recorded policy: the model's error
    error: dict[str, float]
    what_if: Prediction
    policy: str
    notes: list[str]


def whatif(events: list[Event], migration_id: str, policy_spec: str) -> WhatIf:
    rec, m = recorded(events, migration_id)
    same = predict(rec, m.policy, m.mode)
    if not rec.postcopy and same.outcome == "completed" and not same.postcopy:
        rec.handoff_ms = max(0.0, rec.pause_ms - same.pause_ms)
        same = predict(rec, m.policy, m.mode)
    other = policy_from(events, policy_spec)
    error = {
        "passes": same.passes - rec.passes,
        "total_s": round(same.total_s - rec.total_s, 3),
        "total_pct": round(100 * (same.total_s - rec.total_s) / rec.total_s, 1)
        if rec.total_s
        else 0.0,
    }
    notes = []
    if rec.capped_at and model.bandwidth(other.parameters.max_bandwidth, 1e18) > rec.capped_at:
        notes.append(
            f"the recording ran at its cap of {rec.capped_at / (1 << 20):.1f} MiB/s: what the "
            "link could carry beyond it is unknown, so the prediction assumes no more"
        )
    if m.policy.parameters.auto_converge:
        notes.append("the recorded dirty rate is already throttled by auto-converge")
    label = other.name or Path(policy_spec).name
    return WhatIf(rec, same, error, predict(rec, other, m.mode), label, notes)


def render(w: WhatIf) -> str:
    r = w.recorded

    def line(label: str, p: Prediction) -> str:
        return (
            f"{label}: {counted(p.passes, 'pass')}, {p.total_s:.2f} s, pause {p.pause_ms:.1f} ms, "
            f"{p.outcome}{', post-copy' if p.postcopy else ''} ({p.reason})"
        )

    lines = [
        f"migration {r.migration_id} ({r.vm}, {r.memory_mib} MiB, {r.mode}, policy {r.policy})",
        f"  recorded: {counted(r.passes, 'pass')}, {r.total_s:.2f} s, pause {r.pause_ms:.1f} ms, "
        f"{r.outcome}{', post-copy' if r.postcopy else ''}",
        "  " + line("model, same policy", w.model),
        f"  model error: passes {w.error['passes']:+g}, time {w.error['total_s']:+.2f} s "
        f"({w.error['total_pct']:+.1f}%); the pause's handoff share "
        f"({r.handoff_ms:.1f} ms) is taken from the recording",
        "  " + line(f"what if {w.policy}", w.what_if),
        f"  environment: link {r.link_bytes_s / (1 << 20):.1f} MiB/s, dirty rate "
        + ", ".join(f"{d / (1 << 20):.1f}" for d in r.dirty_bytes_s[:8])
        + (" ..." if len(r.dirty_bytes_s) > 8 else "")
        + " MiB/s per pass",
    ]
    lines += [f"  note: {n}" for n in w.notes]
    return joined(lines)


def as_json(w: WhatIf) -> str:
    return json.dumps(asdict(w))
