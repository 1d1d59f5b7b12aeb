"""whimbrelctl reads the coordinator's refusals as refusals: exit 1 with the coordinator's words,
never "cannot reach the coordinator" (exit 3), whatever the status code."""

from __future__ import annotations

import asyncio
import json

from coordinator.core import inputs as I
from tests.integration.conftest import SPEC, Running, SimHostd
from tools.cluster import BIN
from tools.sim import SimHosts


async def ctl(running: Running, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "whimbrelctl"), "--coordinator", running.address, *running.tls_flags(), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_host_that_is_not_connected_is_a_refusal_not_an_unreachable_coordinator(
    coordinator: Running, sim_hosts: SimHosts
) -> None:
    """The coordinator answers UNAVAILABLE for a host it cannot reach: that is its answer."""
    host = SimHostd("host-a", coordinator.channel, sim_hosts)
    await host.start()
    await coordinator.app.request(I.DefineVm(SPEC, coordinator.app.clock()))
    await host.stop()
    code, out, err = await ctl(coordinator, "--json", "vm", "start", "vm-1", "--host", "host-a")
    assert code == 1, err
    assert "cannot reach" not in err and "host 'host-a' is not connected" in err
    assert json.loads(out)["error"] == {
        "code": "UNAVAILABLE",
        "message": "host 'host-a' is not connected",
    }
