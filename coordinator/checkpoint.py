"""Checkpoints: the folded world at some seq, so a restart folds only the tail of the log.

A checkpoint is derived data, never the truth: it sits in a file beside the log
(`<db>.checkpoint`), outside the hash chain, and is used only when
- it was written by this very core (FORMAT hashes the sources that define the state and how
  events fold into it, so an upgrade falls back to a full replay), and
- the log still holds, at the checkpoint's seq, the event whose hash it recorded (a log that was
  replaced, truncated or rewritten is replayed in full).
Anything else, a torn or foreign file included, means a full replay; correctness never depends
on a checkpoint, only start-up time does.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import struct
import sys
from pathlib import Path

from coordinator.core.state import World
from coordinator.log import EventStore
from whimbrel.files import write_atomically

log = logging.getLogger(__name__)
_MAGIC = b"WHIMBREL-CHECKPOINT\n"
_HEADER = struct.Struct(">Q32s32s")  # seq, event hash at seq, format


def _format() -> bytes:
    """Python's version and the sources of the derived state and of folding: what a pickled
    world depends on."""
    digest = hashlib.sha256(sys.version.encode())
    core = Path(__file__).parent / "core"
    for source in ("state.py", "evolve.py"):
        digest.update((core / source).read_bytes())
    return digest.digest()


FORMAT = _format()


def path_for(db: Path) -> Path:
    return db.with_name(db.name + ".checkpoint")


def write(path: Path, world: World, seq: int, event_hash: bytes) -> None:
    """Write atomically: a crash leaves the previous checkpoint or this one."""
    body = pickle.dumps(world, protocol=pickle.HIGHEST_PROTOCOL)
    write_atomically(path, _MAGIC + _HEADER.pack(seq, event_hash, FORMAT) + body)


def load(path: Path, store: EventStore) -> World | None:
    """The checkpointed world if it is usable with this log and this code, else None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("checkpoint %s unreadable (%s): full replay", path, err)
        return None
    head = len(_MAGIC) + _HEADER.size
    if not data.startswith(_MAGIC) or len(data) < head:
        log.warning("checkpoint %s is not one: full replay", path)
        return None
    seq, event_hash, fmt = _HEADER.unpack(data[len(_MAGIC) : head])
    if fmt != FORMAT:
        log.info("checkpoint %s is from other code: full replay", path)
        return None
    at = next(iter(store.read(from_seq=seq, limit=1)), None)
    if at is None or at.seq != seq or at.hash != event_hash:
        log.warning("checkpoint %s does not match the log at seq %d: full replay", path, seq)
        return None
    try:
        world = pickle.loads(data[head:])
    except Exception as err:
        log.warning("checkpoint %s does not load (%s): full replay", path, err)
        return None
    if not isinstance(world, World) or world.last_seq != seq:
        log.warning("checkpoint %s holds something else: full replay", path)
        return None
    return world
