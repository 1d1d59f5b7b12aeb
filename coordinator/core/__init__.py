"""The pure core: migration, VM and host state derived from events, and the decisions taken on it.

Nothing here does I/O, reads a clock or imports asyncio, grpc, sqlite or QEMU (a test checks).
Time arrives on events and inputs. `evolve(world, event)` folds one stored event into the world;
`decide(world, input)` returns the events a decision appends, or raises a `CoreError`.
"""

from coordinator.core.decide import decide
from coordinator.core.errors import (
    AlreadyExists,
    CoreError,
    HostUnavailable,
    IllegalTransition,
    InvalidRequest,
    NotFound,
)
from coordinator.core.events import Event, NewEvent, payload_class, type_name
from coordinator.core.evolve import evolve
from coordinator.core.state import HostState, MigrationState, Phase, VmState, VmStatus, World

__all__ = [
    "AlreadyExists",
    "CoreError",
    "Event",
    "HostState",
    "HostUnavailable",
    "IllegalTransition",
    "InvalidRequest",
    "MigrationState",
    "NewEvent",
    "NotFound",
    "Phase",
    "VmState",
    "VmStatus",
    "World",
    "decide",
    "evolve",
    "payload_class",
    "type_name",
]
