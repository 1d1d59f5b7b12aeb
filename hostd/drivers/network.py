"""Networking of a VM on one host: prepared (devices exist, no traffic), enabled, disabled,
released. Three drivers:

- `NullNetworkDriver`: for VMs without NICs, or hosts whose networking is managed elsewhere.
- `HookNetworkDriver`: runs an operator's executable with the phase as its first argument and
  the VM's details in its environment, as libvirt's qemu hook does.
- `BridgeNetworkDriver`: attaches the VM's tap devices to their Linux bridge only on enable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from hostd.errors import NetworkError
from hostd.qemu import tap_name
from whimbrel.v1 import common_pb2

PHASES = ("prepare", "enable", "disable", "release")
# What a failed phase's error quotes of its output, at most.
MAX_OUTPUT = 4096
# A phase's process (a hook, `ip`) that hangs would hold its command, and with it a migration,
# often in the guest's pause, for good: past this its process group is killed and the phase
# fails, which the coordinator decides on (a retry, then a rollback).
DEFAULT_PHASE_TIMEOUT_S = 30.0


class NetworkDriver(Protocol):
    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        """Run one phase of PHASES for the VM; raise NetworkError on failure."""
        ...


class NullNetworkDriver:
    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        return None


@dataclass
class _Phase:
    """A phase's process and where its output goes: a file, not a pipe, so that a process
    that escaped its group (setsid, `timeout`) and holds the output open cannot hold up the
    wait for the one that was started."""

    proc: asyncio.subprocess.Process
    output: BinaryIO


async def _start(
    args: list[str], env: dict[str, str] | None = None, stdin: int | None = None
) -> _Phase:
    output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by _finish, after the wait
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=stdin, stdout=output, stderr=asyncio.subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: a timeout kills what it started
        )  # fmt: skip
    except BaseException:
        output.close()
        raise
    return _Phase(proc, output)


async def _run(
    args: list[str], limit_s: float, env: dict[str, str] | None = None, what: str = ""
) -> None:
    await _finish(await _start(args, env), None, what or args[0], limit_s)


# Waits for one line on stdin: "go" runs the hook (exec, so it is the hook that exits),
# anything else or end of file (hostd closed the pipe or died) exits without running it.
_ARMED = 'read -r go || exit 0; [ "$go" = go ] || exit 0; exec "$0" "$@"'


async def _finish(phase: _Phase, line: bytes | None, what: str, limit_s: float) -> None:
    """Wait for a phase's process, at most `limit_s` seconds, raising NetworkError (naming
    `what`, if given) when it fails or is killed for taking longer. An armed hook gets its
    answer first: b"go\n" runs it, b"" dismisses it."""
    proc = phase.proc
    try:
        if proc.stdin is not None:
            with contextlib.suppress(ConnectionError):  # (it may have exited already)
                proc.stdin.write(line or b"")
                await proc.stdin.drain()
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), limit_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise NetworkError(
                f"{what or 'network phase'} did not finish in {limit_s:g} s: killed"
            ) from None
        if what and proc.returncode != 0:
            phase.output.seek(0)
            text = phase.output.read(MAX_OUTPUT).decode(errors="replace").strip()
            raise NetworkError(f"{what} failed ({proc.returncode}): {text}")
    finally:
        phase.output.close()


class HookNetworkDriver:
    """The enable phase sits in the guest's pause, and starting a process there costs
    milliseconds on a busy host (and blocks hostd's loop while it forks). So once "prepare"
    succeeded, the "enable" hook is started ahead of time, waiting on its stdin; enabling
    only tells it to go. The hook sees the same arguments and environment either way."""

    def __init__(self, hook: Path, host_id: str, timeout: float = DEFAULT_PHASE_TIMEOUT_S) -> None:
        self.hook = hook
        self.host_id = host_id
        self.timeout = timeout
        self._armed: dict[str, _Phase] = {}

    def _env(self, phase: str, spec: common_pb2.VmSpec) -> dict[str, str]:
        nics = [
            {"mac": n.mac, "bridge": n.bridge, "tap": tap_name(self.host_id, spec.name, i)}
            for i, n in enumerate(spec.nics)
        ]
        return dict(
            os.environ,
            WHIMBREL_PHASE=phase,
            WHIMBREL_VM=spec.name,
            WHIMBREL_HOST=self.host_id,
            WHIMBREL_NICS=json.dumps(nics),
        )

    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        armed = self._armed.pop(spec.name, None)
        if phase == "enable" and armed is not None:
            await _finish(armed, b"go\n", f"network hook {phase}", self.timeout)
            return
        if armed is not None:
            await _finish(armed, b"", "", self.timeout)  # not needed any more
        args = [str(self.hook), phase, spec.name]
        await _run(args, self.timeout, self._env(phase, spec), f"network hook {phase}")
        if phase == "prepare":
            args = ["/bin/sh", "-c", _ARMED, str(self.hook), "enable", spec.name]
            self._armed[spec.name] = await _start(
                args, self._env("enable", spec), asyncio.subprocess.PIPE
            )


class BridgeNetworkDriver:
    """Tap devices are created by QEMU at launch, detached and down: the VM is reachable only
    once enable attaches them to their bridge; disable detaches them again (a rollback)."""

    def __init__(
        self, host_id: str, netns: str = "", timeout: float = DEFAULT_PHASE_TIMEOUT_S
    ) -> None:
        self.host_id = host_id
        self.prefix = ["ip", "-n", netns] if netns else ["ip"]
        self.timeout = timeout

    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        for i, nic in enumerate(spec.nics):
            tap = tap_name(self.host_id, spec.name, i)
            if phase == "enable":
                if not nic.bridge:
                    raise NetworkError(f"NIC {nic.mac} of {spec.name} names no bridge")
                await _run(
                    [*self.prefix, "link", "set", tap, "master", nic.bridge, "up"], self.timeout
                )
            elif phase == "disable":
                await _run([*self.prefix, "link", "set", tap, "nomaster", "down"], self.timeout)
