"""ListVms and ListMigrations answer in pages that always fit in a response: a whole list grew
past what gRPC may send (140 VMs with the largest specs allowed), and since a VM is never
deleted, ListVms then failed for good. whimbrelctl reads every page."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from coordinator.limits import Limits
from tests.integration.conftest import serving
from tools.cluster import BIN
from whimbrel.v1 import common_pb2, migration_pb2, migration_pb2_grpc, vm_pb2, vm_pb2_grpc

# A response may carry 64 KiB here, so a page holds at most 32 KiB of VMs.
LIMITS = Limits(max_send_bytes=64 << 10)


def big_spec(i: int) -> common_pb2.VmSpec:
    """About 12 KiB: three disks with the longest paths allowed."""
    disks = [common_pb2.Disk(path=f"/{i}-{d}-" + "d" * 4000, format="raw") for d in range(3)]
    return common_pb2.VmSpec(name=f"vm-{i:02d}", memory_mib=64, vcpus=1, disks=disks)


async def test_a_list_too_large_for_one_response_comes_in_pages(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with serving(tmp_path, pki_dir, LIMITS) as running:
        vms = vm_pb2_grpc.VmServiceStub(running.channel)
        for i in range(12):  # 144 KiB of specs: more than a response may carry
            await vms.DefineVm(vm_pb2.DefineVmRequest(spec=big_spec(i)))
        first = await vms.ListVms(vm_pb2.ListVmsRequest())
        assert 0 < len(first.vms) < 12 and first.next_page_token == first.vms[-1].spec.name
        names, request = [], vm_pb2.ListVmsRequest(page_size=5)
        while True:
            listed = await vms.ListVms(request)
            assert len(listed.vms) <= 5 and listed.ByteSize() <= 32 << 10
            names += [vm.spec.name for vm in listed.vms]
            if not listed.next_page_token:
                break
            request.page_token = listed.next_page_token
        assert names == [f"vm-{i:02d}" for i in range(12)]
        for bad, problem in ((vm_pb2.ListVmsRequest(page_token="vm-99"), "names nothing"),
                             (vm_pb2.ListVmsRequest(page_size=-1), "negative")):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await vms.ListVms(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert problem in str(refused.value.details())
        # whimbrelctl reads every page.
        process = await asyncio.create_subprocess_exec(
            str(BIN / "whimbrelctl"), "--coordinator", running.address, *running.tls_flags(),
            "--json", "vm", "list", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0
        assert [vm["spec"]["name"] for vm in json.loads(out)["vms"]] == names
        # A small list still comes whole, in one page, as before pages existed.
        migrations = migration_pb2_grpc.MigrationServiceStub(running.channel)
        empty = await migrations.ListMigrations(migration_pb2.ListMigrationsRequest())
        assert list(empty.migrations) == [] and empty.next_page_token == ""
