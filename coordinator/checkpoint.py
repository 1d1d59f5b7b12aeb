"""Checkpoints: the folded world at some seq, so a restart folds only the tail of the log.

A checkpoint is derived data, never the truth: it sits in a file beside the log
(`<db>.checkpoint`, mode 0600), outside the hash chain, and is used only when
- it was written by this very core (FORMAT hashes the sources that define the state, how events
  fold into it and how it is encoded, so an upgrade falls back to a full replay), and
- the log still holds, at the checkpoint's seq, the event whose hash it recorded (a log that was
  replaced, truncated or rewritten is replayed in full).
Anything else, a torn, foreign or hostile file included, means a full replay; correctness never
depends on a checkpoint, only start-up time does.

The body is JSON, never a pickle: whoever can write the file must not run code in the
coordinator. Each value is encoded by the type `core/state.py` declares for it: protobuf messages
as base64 of their bytes, enums by value, dicts as lists of pairs (some keys are tuples), sets
and tuples as lists. A `Command` is written once, in a table, and referred to by its index
wherever it appears, because a migration's `latest` shares the objects of its `commands` (evolve
updates one and decide reads the other). Decoding checks every type on the way; any surprise
means a full replay.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import hashlib
import json
import logging
import struct
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from coordinator.core import state
from coordinator.core.state import Command, CommandState, World
from coordinator.log import EventStore
from whimbrel.files import write_atomically
from whimbrel.v1 import events_pb2

log = logging.getLogger(__name__)
_MAGIC = b"WHIMBREL-CHECKPOINT-JSON\n"
_HEADER = struct.Struct(">Q32s32s")  # seq, event hash at seq, format


def _format() -> bytes:
    """The sources of the derived state, of folding and of this encoding: what a checkpointed
    world depends on."""
    digest = hashlib.sha256()
    core = Path(__file__).parent / "core"
    for source in (core / "state.py", core / "evolve.py", Path(__file__)):
        digest.update(source.read_bytes())
    return digest.digest()


FORMAT = _format()


class Unusable(Exception):
    """The body does not decode into a world of this code."""


def path_for(db: Path) -> Path:
    return db.with_name(db.name + ".checkpoint")


def write(path: Path, world: World, seq: int, event_hash: bytes) -> None:
    """Write atomically (a crash leaves the previous checkpoint or this one), readable by the
    owner only."""
    body = json.dumps(_encode_world(world), separators=(",", ":")).encode()
    write_atomically(path, _MAGIC + _HEADER.pack(seq, event_hash, FORMAT) + body, mode=0o600)


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
        world = _decode_world(json.loads(data[head:]))
    except Exception as err:
        log.warning("checkpoint %s does not load (%s): full replay", path, err)
        return None
    if world.last_seq != seq:
        log.warning("checkpoint %s holds something else: full replay", path)
        return None
    return world


# --- encoding by declared type ----------------------------------------------------------------

Codec = Callable[[Any], Any]
# A Command's slots and their types (it is a slots class, not a dataclass).
_COMMAND_FIELDS: dict[str, Any] = {
    "issued": events_pb2.CommandIssued,
    "issued_at_us": int,
    "state": CommandState,
    "result": events_pb2.CommandResult | None,
    "error": str,
    "rejected": bool,
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(state))


def _check_command_layout() -> None:
    if set(Command.__slots__) != set(_COMMAND_FIELDS):
        raise Unusable(f"Command has slots {sorted(Command.__slots__)}: update the checkpoint")


class _Encoder:
    """One world's encoding: Commands go to a table once, each dataclass instance once."""

    def __init__(self) -> None:
        self.commands: list[Any] = []
        self._command_index: dict[int, int] = {}
        self._seen: set[int] = set()

    def command(self, command: Command) -> int:
        index = self._command_index.get(id(command))
        if index is None:
            index = self._command_index[id(command)] = len(self.commands)
            self.commands.append(None)  # reserved: the slot is filled below
            self.commands[index] = {
                name: self.value(tp, getattr(command, name)) for name, tp in _COMMAND_FIELDS.items()
            }
        return index

    def value(self, tp: Any, value: Any) -> Any:
        return _encoder(tp)(self, value)


@functools.cache
def _encoder(tp: Any) -> Callable[[_Encoder, Any], Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise Unusable(f"cannot encode {tp}")
        inner = _encoder(options[0])
        return lambda enc, v: None if v is None else inner(enc, v)
    if origin is dict:
        key, val = _encoder(args[0]), _encoder(args[1])
        return lambda enc, v: [[key(enc, k), val(enc, x)] for k, x in v.items()]
    if origin in (set, frozenset, list) or (origin is tuple and args[1:] == (...,)):
        item = _encoder(args[0])
        return lambda enc, v: [item(enc, x) for x in v]
    if origin is tuple:
        items = [_encoder(a) for a in args]
        return lambda enc, v: [f(enc, x) for f, x in zip(items, v, strict=True)]
    if tp in (int, str, bool, float):
        return lambda enc, v: v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda enc, v: v.value
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda enc, v: base64.b64encode(v.SerializeToString(deterministic=True)).decode()
    if tp is Command:
        return lambda enc, v: enc.command(v)
    if dataclasses.is_dataclass(tp):
        fields = [(f.name, _encoder(t)) for f, t in _field_types(tp)]

        def instance(enc: _Encoder, v: Any) -> Any:
            if id(v) in enc._seen:  # decoding would split one object into two
                raise Unusable(f"a {type(v).__name__} is shared: update the checkpoint")
            enc._seen.add(id(v))
            return {name: f(enc, getattr(v, name)) for name, f in fields}

        return instance
    raise Unusable(f"cannot encode {tp}")


def _field_types(cls: Any) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _encode_world(world: World) -> dict[str, Any]:
    _check_command_layout()
    enc = _Encoder()
    encoded = enc.value(World, world)
    return {"commands": enc.commands, "world": encoded}


class _Decoder:
    def __init__(self, commands: list[Command]) -> None:
        self.commands = commands


def _expect(kind: type, v: Any) -> Any:
    if type(v) is not kind:
        raise Unusable(f"expected {kind.__name__}, found {type(v).__name__}")
    return v


@functools.cache
def _decoder(tp: Any) -> Callable[[_Decoder, Any], Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise Unusable(f"cannot decode {tp}")
        inner = _decoder(options[0])
        return lambda dec, v: None if v is None else inner(dec, v)
    if origin is dict:
        key, val = _decoder(args[0]), _decoder(args[1])

        def pairs(dec: _Decoder, v: Any) -> dict[Any, Any]:
            out = {}
            for pair in _expect(list, v):
                k, x = _expect(list, pair)
                out[key(dec, k)] = val(dec, x)
            return out

        return pairs
    if origin in (set, frozenset, list) or (origin is tuple and args[1:] == (...,)):
        item, make = _decoder(args[0]), origin
        return lambda dec, v: make(item(dec, x) for x in _expect(list, v))
    if origin is tuple:
        items = [_decoder(a) for a in args]
        return lambda dec, v: tuple(f(dec, x) for f, x in zip(items, _expect(list, v), strict=True))
    if tp is float:
        return lambda dec, v: float(v) if type(v) is int else _expect(float, v)
    if tp in (int, str, bool):
        return lambda dec, v: _expect(tp, v)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda dec, v: tp(v)
    if isinstance(tp, type) and issubclass(tp, Message):
        return lambda dec, v: tp.FromString(base64.b64decode(_expect(str, v), validate=True))
    if tp is Command:
        return lambda dec, v: dec.commands[_expect(int, v)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls: type[Any] = tp
        fields = [(f.name, _decoder(t)) for f, t in _field_types(cls)]
        names = {name for name, _ in fields}

        def instance(dec: _Decoder, v: Any) -> Any:
            if _expect(dict, v).keys() != names:
                raise Unusable(f"{cls.__name__} fields {sorted(v)} are not {sorted(names)}")
            return cls(**{name: f(dec, v[name]) for name, f in fields})

        return instance
    raise Unusable(f"cannot decode {tp}")


def _decode_command(dec: _Decoder, v: Any) -> Command:
    if _expect(dict, v).keys() != _COMMAND_FIELDS.keys():
        raise Unusable(f"Command fields {sorted(v)} are not {sorted(_COMMAND_FIELDS)}")
    values = {name: _decoder(tp)(dec, v[name]) for name, tp in _COMMAND_FIELDS.items()}
    command = Command(values["issued"], values["issued_at_us"])
    command.state, command.result, command.error, command.rejected = (
        values["state"],
        values["result"],
        values["error"],
        values["rejected"],
    )
    return command


def _decode_world(doc: Any) -> World:
    _check_command_layout()
    if _expect(dict, doc).keys() != {"commands", "world"}:
        raise Unusable("not a checkpoint body")
    dec = _Decoder([])
    dec.commands = [_decode_command(dec, c) for c in _expect(list, doc["commands"])]
    world = _decoder(World)(dec, doc["world"])
    if not isinstance(world, World):
        raise Unusable("not a world")
    return world
