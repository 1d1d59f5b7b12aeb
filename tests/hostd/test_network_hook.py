"""The hook network driver: each phase runs the operator's executable with the phase and the
VM's details; "enable", armed ahead of time by "prepare", runs only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostd.drivers.network import HookNetworkDriver
from hostd.errors import NetworkError
from hostd.qemu import tap_name
from whimbrel.v1 import common_pb2

HOOK = """#!/bin/sh
echo "$1 $2 $WHIMBREL_PHASE $WHIMBREL_HOST $WHIMBREL_NICS" >> "{log}"
[ "$1" != "$FAIL_PHASE" ]
"""


def hook(tmp_path: Path) -> tuple[HookNetworkDriver, Path]:
    log = tmp_path / "hook.log"
    path = tmp_path / "hook.sh"
    path.write_text(HOOK.format(log=log))
    path.chmod(0o755)
    return HookNetworkDriver(path, "host-b"), log


SPEC = common_pb2.VmSpec(name="vm-1", nics=[common_pb2.Nic(mac="52:54:00:00:00:01", bridge="br0")])


def phases(log: Path) -> list[list[str]]:
    return [line.split(" ", 4) for line in log.read_text().splitlines()] if log.exists() else []


async def test_enable_runs_the_hook_armed_by_prepare(tmp_path: Path) -> None:
    driver, log = hook(tmp_path)
    await driver.apply("prepare", SPEC)
    assert [p[:4] for p in phases(log)] == [["prepare", "vm-1", "prepare", "host-b"]]
    await driver.apply("enable", SPEC)  # the armed one: same arguments and environment
    (_, enable) = phases(log)
    assert enable[:4] == ["enable", "vm-1", "enable", "host-b"]
    tap = tap_name("host-b", "vm-1", 0)
    assert json.loads(enable[4]) == [{"mac": "52:54:00:00:00:01", "bridge": "br0", "tap": tap}]
    await driver.apply("enable", SPEC)  # a second enable (a retry) starts the hook anew
    assert [p[0] for p in phases(log)] == ["prepare", "enable", "enable"]


async def test_an_armed_hook_that_is_not_needed_never_runs(tmp_path: Path) -> None:
    """A rollback releases a destination's networking that was never enabled."""
    driver, log = hook(tmp_path)
    await driver.apply("prepare", SPEC)
    await driver.apply("release", SPEC)
    assert [p[0] for p in phases(log)] == ["prepare", "release"]


async def test_a_failing_armed_hook_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_PHASE", "enable")
    driver, _ = hook(tmp_path)
    await driver.apply("prepare", SPEC)
    with pytest.raises(NetworkError, match="network hook enable failed"):
        await driver.apply("enable", SPEC)
