"""Storage leases: one lease file per VM in the lockspace shared by the hosts.

A lease records its holder and a generation that only grows. Acquiring a lease another host
holds fails; acquiring with a generation not above the recorded one fails (a stale command).
Every change happens under an exclusive flock of the VM's lock file.

The file is two 512-byte sectors, as sanlock keeps its leases: each sector holds one record
(holder, generation, a version counted up on every write, a CRC). A change overwrites the older
sector in place with one synchronous direct write, so it costs one device write, not the write,
fsync, rename and directory fsync of a replaced file (4 to 10 times slower here while two
QEMUs migrate, right in the guest's pause). A crash mid-write can tear only the sector being
written; its CRC fails and the reader keeps the other, the lease as it was before.

The lockspace is shared, so the driver trusts none of its names: files are opened relative to
the lockspace's descriptor with O_NOFOLLOW (whimbrel.files), and VM names are checked first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from hostd.errors import LeaseError
from whimbrel import files, validate

SECTOR = 512
MAGIC = b"WBLEASE1"
# magic, version, generation, time (µs), holder length; then the holder, the CRC at the end.
_HEAD = struct.Struct("<8sQQQH")
_CRC = struct.Struct("<I")
MAX_HOLDER = SECTOR - _HEAD.size - _CRC.size
MAX_VERSION = 2**64 - 1
# Another host holds a VM's lock for well under a millisecond; one held this long is held by
# something else (a stuck or hostile process on the shared storage), and the change fails
# rather than freezing this hostd. Waits are asyncio sleeps: every other VM is served meanwhile.
LOCK_WAIT_S = 1.0
LOCK_RETRY_S = 0.002


T = TypeVar("T")


class _LockBusy(Exception):
    pass


@dataclass(frozen=True)
class Lease:
    holder: str
    generation: int


class LeaseDriver(Protocol):
    async def acquire(self, vm: str, holder: str, generation: int) -> Lease: ...

    async def release(self, vm: str, holder: str, generation: int | None = None) -> Lease | None:
        """Release if `holder` holds it (at `generation`, when given: holding another one
        raises LeaseError); returns the lease released, None if it held nothing."""
        ...

    def read(self, vm: str) -> Lease: ...


@dataclass(frozen=True)
class _Record:
    version: int
    lease: Lease


def encode(version: int, lease: Lease, time_us: int) -> bytes:
    holder = lease.holder.encode()
    if len(holder) > MAX_HOLDER:
        raise ValueError(f"holder name longer than {MAX_HOLDER} bytes")
    body = _HEAD.pack(MAGIC, version, lease.generation, time_us, len(holder)) + holder
    body = body.ljust(SECTOR - _CRC.size, b"\0")
    return body + _CRC.pack(zlib.crc32(body))


def decode(sector: bytes) -> _Record | None:
    """The record in one sector, or None when it is empty, torn or not a lease record."""
    if len(sector) != SECTOR:
        return None
    body, (crc,) = sector[: -_CRC.size], _CRC.unpack(sector[-_CRC.size :])
    if zlib.crc32(body) != crc:
        return None
    magic, version, generation, _time_us, length = _HEAD.unpack_from(body)
    if magic != MAGIC or length > MAX_HOLDER:
        return None
    holder = body[_HEAD.size : _HEAD.size + length].decode(errors="replace")
    return _Record(version, Lease(holder, generation))


class FileLeaseDriver:
    def __init__(self, lockspace: Path) -> None:
        self.lockspace = lockspace
        lockspace.mkdir(parents=True, exist_ok=True)
        self._dir_fd = files.open_dir(lockspace)
        # Direct I/O where the filesystem has it (so hosts sharing the lockspace over the
        # network read the disk, not their cache); tmpfs and some others refuse it.
        self._direct = getattr(os, "O_DIRECT", 0)
        # An aligned buffer, as direct I/O requires (mmap memory is page-aligned).
        self._buffer = mmap.mmap(-1, 2 * SECTOR)

    def _name(self, vm: str) -> str:
        """The lease file's name, for a valid VM name only."""
        try:
            validate.check_name("VM", vm)
        except validate.Invalid as err:
            raise LeaseError(f"no lease for {vm!r}: {err}", vm=vm) from err
        return f"{vm}.lease"

    @contextlib.contextmanager
    def _locked(self, vm: str) -> Iterator[None]:
        self._name(vm)
        try:
            fd = files.open_in(self._dir_fd, f"{vm}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as err:
            raise LeaseError(f"lock file of {vm} refused: {err}", vm=vm) from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _LockBusy() from None
            yield
        finally:
            os.close(fd)

    def _open(self, name: str, flags: int) -> int:
        if self._direct:
            try:
                return files.open_in(self._dir_fd, name, flags | self._direct, 0o644)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self._direct = 0
        return files.open_in(self._dir_fd, name, flags, 0o644)

    def _newest(self, vm: str) -> _Record | None:
        """The newer of the two sectors' valid records (None: no lease file yet); raises
        LeaseError for a file with none."""
        try:
            fd = self._open(self._name(vm), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LeaseError(f"lease file of {vm} refused: {err}", vm=vm) from err
        try:
            size = os.fstat(fd).st_size
            self._buffer[:] = bytes(2 * SECTOR)
            os.preadv(fd, [self._buffer], 0)
        except OSError as err:
            raise LeaseError(f"lease file of {vm} is unreadable: {err}", vm=vm) from err
        finally:
            os.close(fd)
        records = [r for r in (decode(self._buffer[i : i + SECTOR]) for i in (0, SECTOR)) if r]
        if size and not records:
            raise LeaseError(f"lease file of {vm} holds no valid lease record", vm=vm)
        return max(records, key=lambda r: r.version) if records else None

    def read(self, vm: str) -> Lease:
        newest = self._newest(vm)
        return newest.lease if newest else Lease("", 0)

    def _write(self, vm: str, lease: Lease, newest: _Record | None) -> None:
        """Overwrite the sector `newest` is not in with a record one version newer,
        synchronously."""
        version = newest.version + 1 if newest else 1
        if version > MAX_VERSION:
            raise LeaseError(f"lease file of {vm} is at its last record version: refused", vm=vm)
        name = self._name(vm)
        created = False
        try:
            try:
                fd = self._open(name, os.O_RDWR | os.O_DSYNC)
            except FileNotFoundError:
                fd = self._open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DSYNC)
                created = True
        except OSError as err:
            raise LeaseError(f"lease file of {vm} refused: {err}", vm=vm) from err
        try:
            if created:
                # Both sectors exist from the start, so later writes are pure overwrites; the
                # new file's name is made durable once.
                os.ftruncate(fd, 2 * SECTOR)
                os.fsync(fd)
                os.fsync(self._dir_fd)
            self._buffer[:SECTOR] = encode(version, lease, time.time_ns() // 1000)
            os.pwrite(fd, memoryview(self._buffer)[:SECTOR], (version % 2) * SECTOR)
        except OSError as err:
            raise LeaseError(f"lease file of {vm} could not be written: {err}", vm=vm) from err
        finally:
            os.close(fd)

    def _acquire(self, vm: str, holder: str, generation: int) -> Lease:
        with self._locked(vm):
            newest = self._newest(vm)
            current = newest.lease if newest else Lease("", 0)
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
            self._write(vm, lease, newest)
            return lease

    def _release(self, vm: str, holder: str, generation: int | None) -> Lease | None:
        with self._locked(vm):
            newest = self._newest(vm)
            if newest is None or newest.lease.holder != holder:
                return None
            if generation is not None and newest.lease.generation != generation:
                raise LeaseError(
                    f"lease of {vm} is held by {holder} at generation "
                    f"{newest.lease.generation}, not {generation}: not released",
                    vm=vm,
                )
            self._write(vm, Lease("", newest.lease.generation), newest)
            return newest.lease

    # Run inline: a lease change is a lock, a read and one synchronous sector write (well under
    # a millisecond here), while a hop to a worker thread costs more than that on a busy host,
    # right in the guest's pause. The lock is only ever tried, never waited for in a call.
    async def acquire(self, vm: str, holder: str, generation: int) -> Lease:
        return await self._unlocked(vm, lambda: self._acquire(vm, holder, generation))

    async def release(self, vm: str, holder: str, generation: int | None = None) -> Lease | None:
        return await self._unlocked(vm, lambda: self._release(vm, holder, generation))

    async def _unlocked(self, vm: str, change: Callable[[], T]) -> T:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return change()
            except _LockBusy:
                if time.monotonic() >= deadline:
                    raise LeaseError(
                        f"the lock of {vm}'s lease was held elsewhere for {LOCK_WAIT_S:g} s",
                        vm=vm,
                    ) from None
                await asyncio.sleep(LOCK_RETRY_S)
