"""The switchover bench's samples: a pause is the source's first STOP to the destination's first
RESUME; a sample missing either, or a post-copy run that never went post-copy, is rejected and
counted, never counted as a pause."""

from __future__ import annotations

import pytest

from tools.bench.samples import QmpEvent, Rejection, Sample, Tally, judge

POSTCOPY_SOURCE: list[QmpEvent] = [
    ("MIGRATION", {"status": "setup"}, 1_000),
    ("MIGRATION", {"status": "active"}, 2_000),
    ("MIGRATION", {"status": "postcopy-active"}, 10_000),
    ("STOP", {}, 10_500),
    ("MIGRATION", {"status": "completed"}, 90_000),
]
PRECOPY_SOURCE: list[QmpEvent] = [
    ("MIGRATION", {"status": "active"}, 2_000),
    ("STOP", {}, 10_500),
    ("MIGRATION", {"status": "pre-switchover"}, 10_600),
    ("MIGRATION", {"status": "completed"}, 12_000),
]
DESTINATION: list[QmpEvent] = [
    ("MIGRATION", {"status": "postcopy-active"}, 11_000),
    ("RESUME", {}, 19_500),
    ("RESUME", {}, 40_000),
]


def test_a_complete_postcopy_sample_counts_from_first_stop_to_first_resume() -> None:
    """Source STOP at 10.5 ms and destination RESUME at 19.5 ms make a 9 ms post-copy pause."""
    sample = Sample.from_events(POSTCOPY_SOURCE, DESTINATION)
    assert sample == Sample(
        stop_us=10_500, resume_us=19_500, source_postcopy=True, state_here_us=11_000
    )
    assert sample.pause_ms == 9.0
    assert judge(sample, postcopy=True) is None


def test_a_missing_stop_is_rejected_not_a_zero_pause() -> None:
    """Without the source's STOP there is no pause: the sample is rejected as no_stop and the
    tally's pauses stay empty (the bench once counted it as 0 ms)."""
    source = [e for e in POSTCOPY_SOURCE if e[0] != "STOP"]
    tally = Tally(postcopy=True)
    assert tally.add(Sample.from_events(source, DESTINATION)) is Rejection.NO_STOP
    assert tally.pauses_ms == []
    assert tally.rejected_counts()["no_stop"] == 1


def test_a_missing_resume_is_rejected() -> None:
    """Without the destination's RESUME the sample is rejected as no_resume."""
    destination = [e for e in DESTINATION if e[0] != "RESUME"]
    sample = Sample.from_events(POSTCOPY_SOURCE, destination)
    assert sample.pause_ms is None
    assert judge(sample, postcopy=True) is Rejection.NO_RESUME


def test_a_postcopy_run_that_finished_as_precopy_is_rejected() -> None:
    """Mode postcopy, but the source went from active to completed: a stop-and-copy, rejected
    as not_postcopy, even though the destination reported postcopy-active."""
    source = [e for e in POSTCOPY_SOURCE if e[1].get("status") != "postcopy-active"]
    sample = Sample.from_events(source, DESTINATION)
    assert not sample.source_postcopy
    assert judge(sample, postcopy=True) is Rejection.NOT_POSTCOPY


def test_a_precopy_sample_counts_and_a_postcopy_one_in_precopy_mode_does_not() -> None:
    """A pre-copy switchover counts in mode precopy; a post-copy one there is rejected."""
    precopy = Sample.from_events(PRECOPY_SOURCE, DESTINATION)
    assert judge(precopy, postcopy=False) is None
    postcopy = Sample.from_events(POSTCOPY_SOURCE, DESTINATION)
    assert judge(postcopy, postcopy=False) is Rejection.POSTCOPY_IN_PRECOPY


def test_a_resume_before_the_stop_is_rejected() -> None:
    """A destination RESUME no later than the source's STOP pairs the wrong events: rejected."""
    sample = Sample(stop_us=10_000, resume_us=10_000, source_postcopy=True)
    assert judge(sample, postcopy=True) is Rejection.RESUME_BEFORE_STOP


@pytest.mark.parametrize("postcopy", [True, False])
def test_the_tally_keeps_only_accepted_pauses_and_counts_every_reason(postcopy: bool) -> None:
    """Accepted pauses are kept in order; the counts name every reason, zeros included, and
    their total."""
    good = Sample(stop_us=0, resume_us=8_000, source_postcopy=postcopy)
    tally = Tally(postcopy=postcopy)
    for sample in (
        good,
        Sample(stop_us=None, resume_us=5_000, source_postcopy=postcopy),
        Sample(stop_us=0, resume_us=None, source_postcopy=postcopy),
        Sample(stop_us=0, resume_us=12_000, source_postcopy=not postcopy),
        Sample(stop_us=0, resume_us=10_000, source_postcopy=postcopy),
    ):
        tally.add(sample)
    assert tally.pauses_ms == [8.0, 10.0]
    wrong_mode = "not_postcopy" if postcopy else "postcopy_in_precopy"
    expected = {"total": 3} | dict.fromkeys((r.value for r in Rejection), 0)
    expected |= {"no_stop": 1, "no_resume": 1, wrong_mode: 1}
    assert tally.rejected_counts() == expected


def test_state_here_is_the_destinations_first_status_with_the_sources_state() -> None:
    """The destination's postcopy-active at 11 ms, 0.5 ms after the source's STOP: the pause's
    share that QEMU's own switch takes; a destination that never reports it leaves it unknown,
    and the tally keeps only what accepted samples say."""
    sample = Sample.from_events(POSTCOPY_SOURCE, DESTINATION)
    assert sample.state_here_ms == 0.5
    precopy = Sample.from_events(PRECOPY_SOURCE, [("MIGRATION", {"status": "active"}, 10_000),
                                                 ("MIGRATION", {"status": "completed"}, 12_500),
                                                 ("RESUME", {}, 13_000)])  # fmt: skip
    assert precopy.state_here_ms == 2.0
    silent = Sample.from_events(POSTCOPY_SOURCE, [("RESUME", {}, 19_500)])
    assert silent.state_here_ms is None
    tally = Tally(postcopy=True)
    for s in (sample, silent, Sample.from_events(PRECOPY_SOURCE, DESTINATION)):
        tally.add(s)
    assert tally.pauses_ms == [9.0, 9.0]
    assert tally.state_here_ms == [0.5]
