"""The what-if model (tools.audit.whatif.predict) on environments whose arithmetic can be
followed by hand, with the coordinator's own policy judgements deciding."""

from __future__ import annotations

import pytest

from coordinator.core.validate import effective_policy
from tools.audit.whatif import Recorded, predict
from whimbrel.v1 import common_pb2 as C
from whimbrel.v1 import events_pb2 as E

MIB = 1 << 20
PRECOPY, AUTO = C.MIGRATION_MODE_PRECOPY, C.MIGRATION_MODE_AUTO


def environment(dirty_mib_s: float, link_mib_s: float = 100) -> Recorded:
    return Recorded(
        migration_id="m-1", vm="vm-1", mode="precopy", policy="default", memory_mib=1024,
        passes=0, total_s=0, pause_ms=0, postcopy=False, outcome="completed",
        link_bytes_s=link_mib_s * MIB, capped_at=0, dirty_bytes_s=[dirty_mib_s * MIB],
    )  # fmt: skip


def policy(**fields) -> E.MigrationPolicy:  # type: ignore[no-untyped-def]
    return effective_policy(E.MigrationPolicy(**fields))


def test_a_guest_dirtying_at_half_the_link_converges_as_the_halving_says():
    """1 GiB at 100 MiB/s, dirtying 50 MiB/s: each round leaves half the last (512, 256, ...
    16 MiB); 16 MiB fits 300 ms x 100 MiB/s. Eight passes, counting the final sync."""
    p = predict(environment(50), policy(), PRECOPY)
    assert (p.outcome, p.passes, p.postcopy) == ("completed", 8, False)
    assert p.total_s == pytest.approx(10.24 * (2 - 1 / 32) + 0.16, rel=1e-6)  # 1024..32, 16
    assert p.pause_ms == pytest.approx(160, rel=1e-6)


def test_a_guest_dirtying_faster_than_the_link_stalls_then_aborts_or_switches():
    stall = {"stall_passes": 2, "auto_postcopy_max_passes": 100, "auto_postcopy_min_passes": 100}
    aborted = predict(environment(150), policy(**stall), PRECOPY)
    assert aborted.outcome == "rolled back" and aborted.reason.startswith("stalled")
    switched = predict(environment(150), policy(**stall), AUTO)
    assert switched.postcopy and switched.outcome == "completed"
    assert "stalled" in switched.reason


def test_the_completion_timeout_falls_inside_a_round():
    p = predict(environment(50), policy(completion_timeout_s_per_gib=5), PRECOPY)
    assert (p.outcome, p.total_s) == ("rolled back", 5.0)
    assert p.reason.startswith("completion timeout: pre-copy ran 5 s, over 5 s")


def test_auto_converge_throttles_a_guest_into_converging():
    fast = environment(150)
    never = predict(fast, policy(), PRECOPY)
    assert never.outcome == "never converges"
    throttled = predict(fast, policy(parameters=E.MigrationParameters(auto_converge=True)), PRECOPY)
    assert throttled.outcome == "completed" and not throttled.postcopy


def test_downtime_steps_let_a_migration_finish_sooner():
    steady = predict(environment(50), policy(), PRECOPY)
    stepped = predict(environment(50), policy(downtime_steps_ms=[1000, 2000]), PRECOPY)
    assert stepped.passes < steady.passes and stepped.total_s < steady.total_s


def test_the_cli_refuses_a_bad_policy_file_and_an_unknown_migration(tmp_path, capsys):
    """A recorded migration (the core's simulated hosts, a real SQLite log): a policy file that
    is not a MigrationPolicy exits 2 naming it (like an unreadable log), an invalid policy and
    an unknown migration exit 1 with why (like `timeline`); a good file predicts."""
    from coordinator.core import inputs as I
    from tests.unit.helpers import fresh
    from tools.audit.cli import main
    from tools.sim import store_log

    driver, hosts = fresh()
    driver.request(I.StartMigration("m-1", "vm-1", "host-b", PRECOPY, E.MigrationPolicy(),
                                    driver.now_us))  # fmt: skip
    driver.run("m-1", hosts)
    store_log(driver.log, tmp_path / "log.db").close()
    db = str(tmp_path / "log.db")
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"parameters": {"max_bandwidth": "lots"}}')
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"downtime_steps_ms": [9000]}')
    good = tmp_path / "good.json"
    good.write_text('{"parameters": {"max_bandwidth": "1048576"}}')
    capsys.readouterr()
    assert main(["whatif", db, "--migration", "m-1", "--policy", str(garbage)]) == 2
    assert f"policy file {garbage}" in capsys.readouterr().err
    assert main(["whatif", db, "--migration", "m-1", "--policy", str(invalid)]) == 1
    assert "at most 2000 ms" in capsys.readouterr().err
    assert main(["whatif", db, "--migration", "m-9", "--policy", str(good)]) == 1
    assert "no migration 'm-9'" in capsys.readouterr().err
    assert main(["whatif", db, "--migration", "m-1", "--policy", str(good)]) == 0
    assert "what if good.json:" in capsys.readouterr().out
