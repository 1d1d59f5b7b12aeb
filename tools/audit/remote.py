"""Read a live coordinator's log through `EventLogService` for `verify --against`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from coordinator.log import StoredEvent
from whimbrel.tls import TlsError, TlsFiles, channel
from whimbrel.v1 import eventlog_pb2, eventlog_pb2_grpc

from .logfile import Unreadable


def remote_events(
    target: str, tls: TlsFiles | None = None, timeout: float = 60.0
) -> Iterator[StoredEvent]:
    """Every event of the coordinator at `target` (HOST:PORT), as stored, in seq order; over
    mutual TLS with `tls` (the caller needs the viewer role).

    The payload bytes are the stored (hashed) ones, so the chain is checked exactly as on a
    file; only the append-only triggers are out of sight."""
    try:
        opened = channel(target, tls)
    except TlsError as err:
        raise Unreadable(str(err)) from err
    with opened:
        stub = eventlog_pb2_grpc.EventLogServiceStub(opened)
        try:
            for e in stub.ReadEvents(eventlog_pb2.ReadEventsRequest(from_seq=1), timeout=timeout):
                yield StoredEvent(
                    e.seq, e.stream, e.type, e.epoch, e.time_us, e.payload_bytes,
                    e.origin.host_id, e.origin.generation, e.origin.seq, e.prev_hash, e.hash,
                )  # fmt: skip
        except grpc.RpcError as err:
            raise Unreadable(f"{target}: {err.code().name}: {err.details()}") from err
