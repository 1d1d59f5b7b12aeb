"""The hook network driver: each phase runs the operator's executable with the phase and the
VM's details; "enable", armed ahead of time by "prepare", runs only when asked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
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


HANGING_HOOK = """#!/bin/sh
[ "$1" = "$HANG_PHASE" ] || exit 0
sleep 600 &
echo $$ $! > "{pids}"
wait
"""


@pytest.mark.parametrize("phase", ["enable", "release"])
async def test_a_hook_that_hangs_is_killed_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    """A hook that never returns would hold its command, and a migration with it, for good:
    past the driver's limit it is killed with what it started, and the phase fails, naming
    why. (enable: the hook armed by prepare; release: one started for the phase.)"""
    monkeypatch.setenv("HANG_PHASE", phase)
    pids = tmp_path / "pids"
    path = tmp_path / "hook.sh"
    path.write_text(HANGING_HOOK.format(pids=pids))
    path.chmod(0o755)
    driver = HookNetworkDriver(path, "host-b", timeout=0.5)
    await driver.apply("prepare", SPEC)
    started = time.monotonic()
    with pytest.raises(NetworkError, match=f"network hook {phase} did not finish in 0.5 s"):
        await driver.apply(phase, SPEC)
    assert time.monotonic() - started < 5
    for pid in map(int, pids.read_text().split()):  # the hook, and the sleep it started
        assert _dead(pid), pid


def _dead(pid: int) -> bool:
    """Gone, or a zombie (killed, not yet reaped by whoever inherited it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _vm_state(state_dir: Path, network_phase: str) -> Path:
    """What a hostd that set up vm-1's networking leaves in its state dir."""
    from hostd.vm import VmRuntime

    async def emit(message: object, seq: int) -> None:
        return None

    runtime = VmRuntime(SPEC, state_dir / "vms" / "vm-1", emit, "destination")  # type: ignore[arg-type]
    runtime.save()
    runtime.save_network_phase(network_phase)
    return runtime.paths.root


async def test_a_qemu_found_gone_after_a_restart_gets_its_network_released(
    tmp_path: Path,
) -> None:
    """A QEMU that died while no hostd watched, after its networking was enabled: the
    restarted hostd reports the exit and runs `release`, so the dead copy does not keep the
    VM's networking where it no longer runs."""
    from hostd.agent import Agent

    driver, log = hook(tmp_path)
    _vm_state(tmp_path / "state", "enable")  # and no pidfile: the QEMU is gone
    agent = Agent("host-b", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                  driver)  # fmt: skip
    await agent.reattach()
    assert [p[:2] for p in phases(log)] == [["release", "vm-1"]]
    kinds = [e.payload.WhichOneof("kind") for e in agent.pending]
    assert kinds[-2:] == ["qemu_exited", "network_changed"]
    await agent.close()


async def test_a_reattached_qemu_that_exits_gets_its_network_released(tmp_path: Path) -> None:
    """A QEMU a restarted hostd re-attached to is watched like one it launched: when it
    exits, `release` runs."""
    import asyncio
    import sys

    from hostd.agent import Agent

    inner, log = hook(tmp_path)
    released = asyncio.Event()

    class Watched(HookNetworkDriver):
        async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
            await inner.apply(phase, spec)
            if phase == "release":
                released.set()

    driver = Watched(tmp_path / "hook.sh", "host-b")
    root = _vm_state(tmp_path / "state", "enable")
    pidfile = root / "qemu.pid"
    # Stands in for QEMU: hostd recognises its QEMU by the pidfile path on the command line.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", str(pidfile)
    )
    pidfile.write_text(str(process.pid))
    agent = Agent("host-b", "127.0.0.1:1", tmp_path / "state", tmp_path / "locks", "127.0.0.1",
                  driver)  # fmt: skip
    try:
        await agent.reattach()  # its QMP never answers: tracked all the same
        assert phases(log) == []
        process.kill()
        await process.wait()
        await asyncio.wait_for(released.wait(), 10)  # beside the exit watch
        assert [p[:2] for p in phases(log)] == [["release", "vm-1"]]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await agent.close()


ESCAPING_HOOK = """#!/bin/sh
setsid sleep 600 &
echo $! > "{pids}"
sleep 600
"""


async def test_a_hook_whose_child_escaped_its_group_still_fails_on_time(tmp_path: Path) -> None:
    """A child in a session of its own outlives the kill of the hook's group, and once held
    the hook's output pipe open, and with it the wait, as long as it ran: the output goes to
    a file, so the phase fails on time all the same."""
    pids = tmp_path / "pids"
    path = tmp_path / "hook.sh"
    path.write_text(ESCAPING_HOOK.format(pids=pids))
    path.chmod(0o755)
    driver = HookNetworkDriver(path, "host-b", timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(NetworkError, match=r"did not finish in 0\.5 s"):
            await driver.apply("release", SPEC)
        assert time.monotonic() - started < 5
    finally:
        escaped = int(pids.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(escaped, signal.SIGKILL)
