"""Networking of a VM on one host: prepared (devices exist, no traffic), enabled, disabled,
released. Three drivers:

- `NullNetworkDriver`: for VMs without NICs, or hosts whose networking is managed elsewhere.
- `HookNetworkDriver`: runs an operator's executable with the phase as its first argument and
  the VM's details in its environment, as libvirt's qemu hook does.
- `BridgeNetworkDriver`: attaches the VM's tap devices to their Linux bridge only on enable.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Protocol

from hostd.errors import NetworkError
from hostd.qemu import tap_name
from whimbrel.v1 import common_pb2

PHASES = ("prepare", "enable", "disable", "release")


class NetworkDriver(Protocol):
    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        """Run one phase of PHASES for the VM; raise NetworkError on failure."""
        ...


class NullNetworkDriver:
    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        return None


async def _run(args: list[str], env: dict[str, str] | None = None, what: str = "") -> None:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    await _finish(proc, None, what or args[0])


# Waits for one line on stdin: "go" runs the hook (exec, so it is the hook that exits),
# anything else or end of file (hostd closed the pipe or died) exits without running it.
_ARMED = 'read -r go || exit 0; [ "$go" = go ] || exit 0; exec "$0" "$@"'


async def _finish(proc: asyncio.subprocess.Process, line: bytes | None, what: str) -> None:
    """Wait for a process, raising NetworkError (naming `what`, if given) when it fails. An
    armed hook gets its answer first: b"go\n" runs it, b"" dismisses it."""
    output, _ = await proc.communicate(line)
    if what and proc.returncode != 0:
        text = output.decode(errors="replace").strip()
        raise NetworkError(f"{what} failed ({proc.returncode}): {text}")


class HookNetworkDriver:
    """The enable phase sits in the guest's pause, and starting a process there costs
    milliseconds on a busy host (and blocks hostd's loop while it forks). So once "prepare"
    succeeded, the "enable" hook is started ahead of time, waiting on its stdin; enabling
    only tells it to go. The hook sees the same arguments and environment either way."""

    def __init__(self, hook: Path, host_id: str) -> None:
        self.hook = hook
        self.host_id = host_id
        self._armed: dict[str, asyncio.subprocess.Process] = {}

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
            await _finish(armed, b"go\n", f"network hook {phase}")
            return
        if armed is not None:
            await _finish(armed, b"", "")  # not needed any more
        args = [str(self.hook), phase, spec.name]
        await _run(args, self._env(phase, spec), f"network hook {phase}")
        if phase == "prepare":
            self._armed[spec.name] = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", _ARMED, str(self.hook), "enable", spec.name,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=self._env("enable", spec),
            )  # fmt: skip


class BridgeNetworkDriver:
    """Tap devices are created by QEMU at launch, detached and down: the VM is reachable only
    once enable attaches them to their bridge; disable detaches them again (a rollback)."""

    def __init__(self, host_id: str, netns: str = "") -> None:
        self.host_id = host_id
        self.prefix = ["ip", "-n", netns] if netns else ["ip"]

    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        for i, nic in enumerate(spec.nics):
            tap = tap_name(self.host_id, spec.name, i)
            if phase == "enable":
                if not nic.bridge:
                    raise NetworkError(f"NIC {nic.mac} of {spec.name} names no bridge")
                await _run([*self.prefix, "link", "set", tap, "master", nic.bridge, "up"])
            elif phase == "disable":
                await _run([*self.prefix, "link", "set", tap, "nomaster", "down"])
