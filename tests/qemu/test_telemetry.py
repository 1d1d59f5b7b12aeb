"""Traces and metrics of a real migration: spans reach a real OTLP receiver with the
coordinator -> hostd -> QMP structure, and the Prometheus endpoint is scraped mid-flight."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from coordinator.telemetry import ids
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.qemu.scenario import start_migration, wait_destination_running
from tools.cluster import Cluster
from tools.guest import random_ram
from whimbrel.v1 import common_pb2

pytestmark = pytest.mark.qemu
ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value} (labels kept verbatim)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def one(samples: dict[str, float], name: str, **labels: str) -> float:
    for key, value in samples.items():
        metric, _, rest = key.partition("{")
        if metric == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    names = sorted({key.partition("{")[0] for key in samples})
    raise AssertionError(f"no sample {name} {labels}; metrics: {names}")


def test_migration_traces_and_metrics(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        cluster = Cluster(
            tmp_path,
            env={
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
            coordinator_args=["--metrics-listen", "127.0.0.1:0"],
        )
        try:
            cluster.start("host-a", "host-b")
            ram = random_ram(tmp_path / "ram.bin", 64)
            cluster.define_and_start("vm-1", "host-a", ram_file=ram)
            head = cluster.head()
            start_migration(cluster, common_pb2.MIGRATION_MODE_POSTCOPY,
                            max_bandwidth=100_000, max_postcopy_bandwidth=10 << 20)  # fmt: skip
            wait_destination_running(cluster, head)  # mid-flight: post-copy pages still flow
            during = scrape(cluster.metrics_port)
            assert one(during, "whimbrel_hosts_connected") == 2
            assert one(during, "whimbrel_migrations_open") == 1
            assert one(during, "whimbrel_switchover_pause_seconds_count") == 1
            assert one(during, "whimbrel_log_events_appended_total") > 20
            assert one(during, "whimbrel_recovery_duration_seconds") > 0
            final = cluster.watch("m-1")
            assert final.phase == common_pb2.MIGRATION_PHASE_COMPLETED
            after = scrape(cluster.metrics_port)
            assert one(after, "whimbrel_migrations_total", outcome="completed") == 1
            assert one(after, "whimbrel_migrations_open") == 0
            pause_s = one(after, "whimbrel_switchover_pause_seconds_sum")
            assert pause_s == pytest.approx(final.pause_us / 1e6, abs=1e-6)
            assert one(after, "whimbrel_migration_transferred_bytes_total") > 32 << 20
            assert one(after, "whimbrel_migration_phase_duration_seconds_count",
                       phase="finishing") == 1  # fmt: skip
            assert one(after, "whimbrel_log_append_duration_seconds_count") > 0
            _assert_dashboard_uses_only(after)
            # Graceful stops flush the spans still batched.
            for name in ("host-a", "host-b", "coordinator"):
                assert cluster.processes[name].stop() == 0
            spans = receiver.wait_for(_whole_trace)
        finally:
            cluster.teardown()
    _assert_trace_structure([s for s in spans if s.trace_id == ids.trace_id("m-1")])


def _assert_dashboard_uses_only(samples: dict[str, float]) -> None:
    """Every series the Grafana dashboard queries is one the coordinator really exports."""
    dashboard = json.loads((ROOT / "tools" / "dashboards" / "whimbrel.json").read_text())
    exported = {key.partition("{")[0] for key in samples}
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bwhimbrel_\w+", target["expr"])
    }
    assert len(queried) >= 8 and queried <= exported, queried - exported


def _whole_trace(spans: list[ReceivedSpan]) -> bool:
    names = {(s.service, s.name) for s in spans if s.trace_id == ids.trace_id("m-1")}
    return {
        ("whimbrel-coordinator", "migration vm-1"),
        ("whimbrel-hostd", "hostd resume-vm"),
        ("whimbrel-hostd", "qmp cont"),
        ("whimbrel-hostd", "hostd destroy-vm"),
    } <= names


def _assert_trace_structure(spans: list[ReceivedSpan]) -> None:
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.name == "migration vm-1"]
    assert root.span_id == ids.root_span_id("m-1") and root.parent_span_id == 0
    assert root.attributes["whimbrel.outcome"] == "completed"
    assert (root.attributes["whimbrel.source"], root.attributes["whimbrel.destination"]) == (
        "host-a", "host-b")  # fmt: skip
    assert root.attributes["whimbrel.pause_us"] > 0
    phases = [s for s in spans if s.name.startswith("phase ")]
    assert {"phase preparing", "phase transferring", "phase finishing"} <= {s.name for s in phases}
    assert all(s.parent_span_id == root.span_id for s in phases)
    coordinator = [s for s in spans if s.service == "whimbrel-coordinator"]
    commands = {
        s.attributes["whimbrel.command.id"]: s for s in coordinator if s.name.startswith("command ")
    }
    assert all(s.parent_span_id == root.span_id for s in commands.values())
    assert all(s.span_id == ids.command_span_id(cid) for cid, s in commands.items())
    # hostd's span for each command is a child of the coordinator's span for it, and each QMP
    # command a child of hostd's.
    executed = [s for s in spans if s.service == "whimbrel-hostd" and s.name.startswith("hostd ")]
    assert {s.name.removeprefix("hostd ") for s in executed} >= {
        "prepare-incoming", "start-migration", "resume-vm", "destroy-vm"}  # fmt: skip
    for span in executed:
        parent = by_id[span.parent_span_id]
        assert parent.attributes["whimbrel.command.id"] == span.attributes["whimbrel.command.id"]
        assert parent.name == f"command {span.attributes['whimbrel.command.kind']}"
    (cont,) = [s for s in spans if s.name == "qmp cont"]
    cont_parent = by_id[cont.parent_span_id]
    assert (
        cont_parent.name == "hostd resume-vm"
        and cont_parent.attributes["whimbrel.host"] == "host-b"
    )
    assert cont.attributes["rpc.method"] == "cont"
