"""The record budget: record-only QMP events go up in a burst then at a steady rate; the
events hostd and the coordinator act on have a far larger budget of their own; dropped ones
are counted, by name."""

from __future__ import annotations

from hostd.event_budget import MAX_NAME, MAX_NAMES, OTHERS, RecordBudget
from whimbrel import protocol


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate() -> None:
    clock = Clock()
    budget = RecordBudget(rate_per_s=5.0, burst=3, clock=clock)
    assert [budget.admit("RESET") for _ in range(5)] == [True, True, True, False, False]
    clock.now += 0.2  # one more at 5 a second
    assert [budget.admit("RESET") for _ in range(2)] == [True, False]
    clock.now += 60  # refilled, never beyond the burst
    assert sum(budget.admit("RTC_CHANGE") for _ in range(10)) == 3
    assert budget.take_dropped() == {"RESET": 3, "RTC_CHANGE": 7}
    assert budget.take_dropped() == {}


def test_the_events_acted_on_have_a_budget_of_their_own() -> None:
    """The record budget spent takes nothing from the events acted on; those have a far larger
    budget of their own (a QEMU taken over can send any number)."""
    clock = Clock()
    budget = RecordBudget(
        rate_per_s=0.0, burst=0, clock=clock, acted_on_rate_per_s=10.0, acted_on_burst=100
    )
    assert not budget.admit("RESET")
    for name in sorted(protocol.QMP_EVENTS_ACTED_ON):
        assert all(budget.admit(name) for _ in range(20))
    assert [budget.admit("STOP") for _ in range(2)] == [False, False]
    clock.now += 0.15  # one more at 10 a second
    assert [budget.admit("STOP") for _ in range(2)] == [True, False]
    assert budget.take_dropped() == {"RESET": 1, "STOP": 3}


def test_a_report_names_a_bounded_number_of_events() -> None:
    """A broken QEMU could make up any number of event names, each of any length."""
    budget = RecordBudget(rate_per_s=0.0, burst=0, clock=Clock())
    for n in range(100):
        for _ in range(n + 1):
            budget.admit(f"EVENT_{n:03d}_" + "X" * 200)
    report = budget.take_dropped()
    assert len(report) == MAX_NAMES + 1
    assert all(len(name) <= MAX_NAME for name in report)
    assert sum(report.values()) == sum(range(1, 101))
    assert report[OTHERS] == sum(range(1, 101 - MAX_NAMES))
