"""The coordinator's resource limits: what one client, host or message may take of it.

    max_receive_bytes      largest message accepted (a larger one: RESOURCE_EXHAUSTED)
    max_send_bytes         largest message sent
    max_concurrent_rpcs    calls served at once, streams included (then RESOURCE_EXHAUSTED)
    max_watch_streams      of those, streams a client keeps open (ReadEvents with follow,
                           WatchMigration), so watchers never take the hosts' and operators'
                           room (coordinator.watch_slots) ...
    max_watch_streams_per_caller   ... and of those, one caller's (a principal's)
    host_queue_events      a host's events read off its stream and not yet folded; when full,
                           the stream is not read, so HTTP/2 flow control holds hostd back
                           (hostd keeps every event until it is acknowledged: nothing is lost)
    read_batch_events      events one ReadEvents read takes from the log at most ...
    read_batch_bytes       ... and payload bytes (at least one event, however large)

The defaults leave a hostd's largest message (a backlog after an outage goes up in messages of
at most 256 observations and 1 MiB, `hostd.agent.MAX_BATCH_BYTES`) well below the receive
bound, and room for many watchers besides every host's stream: half the
server's calls may be watches, and one caller (an orchestrator watching each migration it runs,
say) may hold 128 of them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIB", "Limits"]

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_receive_bytes: int = 4 * MIB
    max_send_bytes: int = 16 * MIB
    max_concurrent_rpcs: int = 1024
    max_watch_streams: int = 512
    max_watch_streams_per_caller: int = 128
    host_queue_events: int = 1024
    read_batch_events: int = 256
    read_batch_bytes: int = 1 * MIB

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", self.max_send_bytes),
        ]
