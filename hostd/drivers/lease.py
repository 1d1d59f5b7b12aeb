"""Storage leases: one lease file per VM in the lockspace shared by the hosts.

A lease records its holder and a generation that only grows. Acquiring a lease another host
holds fails; acquiring with a generation not above the recorded one fails (a stale command).
Every change happens under an exclusive flock of the VM's lock file and is written atomically
(write, fsync, rename, fsync the directory), so a crash leaves the old or the new lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hostd.errors import LeaseError
from whimbrel.files import write_atomically


@dataclass(frozen=True)
class Lease:
    holder: str
    generation: int


class LeaseDriver(Protocol):
    async def acquire(self, vm: str, holder: str, generation: int) -> Lease: ...

    async def release(self, vm: str, holder: str) -> Lease | None:
        """Release if `holder` holds it; returns the lease released, None if it held nothing."""
        ...

    def read(self, vm: str) -> Lease: ...


class FileLeaseDriver:
    def __init__(self, lockspace: Path) -> None:
        self.lockspace = lockspace
        lockspace.mkdir(parents=True, exist_ok=True)

    def _path(self, vm: str) -> Path:
        return self.lockspace / f"{vm}.lease"

    @contextlib.contextmanager
    def _locked(self, vm: str) -> Iterator[None]:
        fd = os.open(self.lockspace / f"{vm}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self, vm: str) -> Lease:
        try:
            data = json.loads(self._path(vm).read_text())
            return Lease(str(data.get("holder", "")), int(data.get("generation", 0)))
        except FileNotFoundError:
            return Lease("", 0)
        except (ValueError, OSError) as err:
            raise LeaseError(f"lease file of {vm} is unreadable: {err}", vm=vm) from err

    def _write(self, vm: str, lease: Lease) -> None:
        path = self._path(vm)
        tmp = path.with_suffix(".tmp")
        record = {"holder": lease.holder, "generation": lease.generation, "time": time.time()}
        write_atomically(path, json.dumps(record).encode(), tmp)

    def _acquire(self, vm: str, holder: str, generation: int) -> Lease:
        with self._locked(vm):
            current = self.read(vm)
            if current.holder and current.holder != holder:
                raise LeaseError(
                    f"lease of {vm} is held by {current.holder} (generation {current.generation})",
                    vm=vm,
                )
            if generation <= current.generation:
                raise LeaseError(
                    f"generation {generation} is not above {current.generation} "
                    f"for the lease of {vm}",
                    vm=vm,
                )
            lease = Lease(holder, generation)
            self._write(vm, lease)
            return lease

    def _release(self, vm: str, holder: str) -> Lease | None:
        with self._locked(vm):
            current = self.read(vm)
            if current.holder != holder:
                return None
            self._write(vm, Lease("", current.generation))
            return current

    # Run inline: a lease change is a lock, two small writes and fsyncs (well under a
    # millisecond here), while a hop to a worker thread costs more than that on a busy host,
    # right in the guest's pause.
    async def acquire(self, vm: str, holder: str, generation: int) -> Lease:
        return self._acquire(vm, holder, generation)

    async def release(self, vm: str, holder: str) -> Lease | None:
        return self._release(vm, holder)
