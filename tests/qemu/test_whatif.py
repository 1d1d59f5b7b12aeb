"""`whimbrel-audit whatif` on a migration recorded with real QEMU: the model's error against
what happened, and predictions under other policies (stored in the log, or a file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.qemu.conftest import Cluster
from tests.qemu.scenario import assert_outcome, start_migration
from tests.qemu.test_ctl import ctl
from tools.audit.cli import main as audit
from whimbrel.v1 import common_pb2

pytestmark = pytest.mark.qemu
PHASE = common_pb2.MigrationPhase


def test_whatif_replays_a_real_migration_under_other_policies(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.guest import random_ram

    ram = random_ram(tmp_path / "ram.bin", 64)
    cluster.define_and_start("vm-1", "host-a", ram_file=ram)
    start_migration(cluster, common_pb2.MIGRATION_MODE_PRECOPY, max_bandwidth=32 << 20)
    assert_outcome(cluster, PHASE.MIGRATION_PHASE_COMPLETED, "host-b")
    fast = ctl(cluster, "policy", "define", "fast", "--bandwidth", str(256 << 20))
    assert fast.returncode == 0, fast.stderr
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps({
        "parameters": {"max_bandwidth": str(8 << 20)},
        "completion_timeout_s_per_gib": 2,
        "on_stall": "STALL_ACTION_ABORT",
    }))  # fmt: skip

    def whatif(policy: str) -> dict:  # type: ignore[type-arg]
        capsys.readouterr()
        code = audit(["whatif", str(cluster.db), "--migration", "m-1", "--policy", policy,
                      "--json"])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        return json.loads(out)  # type: ignore[no-any-return]

    faster = whatif("fast")
    recorded, model = faster["recorded"], faster["model"]
    print(json.dumps({"recorded": recorded, "model": model, "error": faster["error"]}))
    # The recording: 64 MiB at 32 MiB/s took about two seconds, and completed.
    assert recorded["outcome"] == "completed" and recorded["passes"] >= 1
    assert 1.0 < recorded["total_s"] < 20, recorded
    assert recorded["link_bytes_s"] > 0 and recorded["capped_at"] == 32 << 20
    # The model, under the recorded policy, tells the same story within a factor of two.
    assert model["outcome"] == "completed"
    assert 0.5 < model["total_s"] / recorded["total_s"] < 2.0, faster["error"]
    assert abs(faster["error"]["passes"]) <= 2, faster["error"]
    # A higher cap than the recording ran at is credited only with what the recording achieved
    # (the link's capacity beyond it is unknown): said, not guessed.
    assert 0.8 * model["total_s"] <= faster["what_if"]["total_s"] <= model["total_s"]
    assert any("ran at its cap" in note for note in faster["notes"])
    # Slower and with a 2 s completion timeout (per GiB, a GiB at least): rolled back.
    slower = whatif(str(slow))
    assert slower["what_if"]["outcome"] == "rolled back"
    assert slower["what_if"]["reason"].startswith("completion timeout")
    # Text mode names the migration and the policy; an unknown policy is refused.
    capsys.readouterr()
    assert audit(["whatif", str(cluster.db), "--migration", "m-1", "--policy", "fast"]) == 0
    assert "what if fast:" in capsys.readouterr().out
    assert audit(["whatif", str(cluster.db), "--migration", "m-1", "--policy", "nope"]) == 1
