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
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        text = output.decode(errors="replace").strip()
        raise NetworkError(f"{what or args[0]} failed ({proc.returncode}): {text}")


class HookNetworkDriver:
    def __init__(self, hook: Path, host_id: str) -> None:
        self.hook = hook
        self.host_id = host_id

    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        nics = [
            {"mac": n.mac, "bridge": n.bridge, "tap": tap_name(self.host_id, spec.name, i)}
            for i, n in enumerate(spec.nics)
        ]
        env = dict(
            os.environ,
            WHIMBREL_PHASE=phase,
            WHIMBREL_VM=spec.name,
            WHIMBREL_HOST=self.host_id,
            WHIMBREL_NICS=json.dumps(nics),
        )
        await _run([str(self.hook), phase, spec.name], env, f"network hook {phase}")


class BridgeNetworkDriver:
    """Tap devices are created by QEMU at launch, detached; enable attaches them."""

    def __init__(self, host_id: str, netns: str = "") -> None:
        self.host_id = host_id
        self.prefix = ["ip", "netns", "exec", netns] if netns else []

    async def apply(self, phase: str, spec: common_pb2.VmSpec) -> None:
        for i, nic in enumerate(spec.nics):
            tap = tap_name(self.host_id, spec.name, i)
            if phase == "enable":
                if not nic.bridge:
                    raise NetworkError(f"NIC {nic.mac} of {spec.name} names no bridge")
                await _run([*self.prefix, "ip", "link", "set", tap, "master", nic.bridge, "up"])
            elif phase == "disable":
                await _run([*self.prefix, "ip", "link", "set", tap, "nomaster"])
