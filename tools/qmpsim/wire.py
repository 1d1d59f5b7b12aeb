"""The QMP wire protocol, as QEMU 7.2 speaks it on a unix socket.

One client at a time (a second one waits, ungreeted, until the first leaves, as with QEMU's
single-connection chardev). The greeting offers `oob`; until `qmp_capabilities` only that
command is accepted, and events are held back from an unnegotiated client (and lost while no
client is there, as QEMU loses them). Replies echo `id`; error replies and descriptions are
QEMU's own, checked against a real QEMU 7.2. Messages are JSON objects with or without a line
break between them, like QEMU's streaming parser takes them.

Command handlers are synchronous: events a handler emits are written before its reply, which
is QEMU's order for events raised inside a command (STOP before the reply of `stop`). So
`exec-oob` needs no queue of its own: every command runs as soon as it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Command", "Monitor", "QmpError", "Splitter", "param"]

GREETING = {
    "QMP": {
        "version": {
            "qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3",
        },
        "capabilities": ["oob"],
    }
}
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
    "number": (int, float),
    "array": (list,),
    "object": (dict,),
    "string or null": (str, type(None)),
}
MEMBERS = frozenset(("execute", "exec-oob", "arguments", "id", "control"))


class QmpError(Exception):
    """A command's error reply: QEMU's error class and description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class Param:
    json_type: str
    required: bool = True


def param(json_type: str, required: bool = True) -> Param:
    return Param(json_type, required)


@dataclass(frozen=True)
class Command:
    handler: Callable[[dict[str, Any]], Any]
    # None: any arguments (the handler checks them itself, as object-add does).
    params: dict[str, Param] | None = field(default_factory=dict)
    # Allowed with exec-oob (QEMU 7.2: migrate-recover and migrate-pause).
    oob: bool = False


def check_arguments(params: dict[str, Param], arguments: dict[str, Any]) -> None:
    for name in arguments:
        if name not in params:
            raise QmpError(f"Parameter '{name}' is unexpected")
    for name, spec in params.items():
        if name not in arguments:
            if spec.required:
                raise QmpError(f"Parameter '{name}' is missing")
            continue
        value = arguments[name]
        types = JSON_TYPES[spec.json_type]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise QmpError(f"Invalid parameter type for '{name}', expected: {spec.json_type}")


class Splitter:
    """Cuts a byte stream into JSON texts: each top-level object or array once its brackets
    close, anything else at the next white space."""

    def __init__(self) -> None:
        self._buffer: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[str]:
        texts = []
        for char in text:
            if self._depth == 0 and not self._buffer and char.isspace():
                continue
            if self._depth == 0 and self._buffer and not self._bracketed() and char.isspace():
                texts.append(self._take())
                continue
            self._buffer.append(char)
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    texts.append(self._take())
        return texts

    def _bracketed(self) -> bool:
        return self._buffer[0] in "{["

    def _take(self) -> str:
        text = "".join(self._buffer)
        self._buffer, self._depth, self._in_string, self._escaped = [], 0, False, False
        return text


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


class Session:
    """One connected client."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.oob = False

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(_encode(message))


class Monitor:
    """Serves QMP on a listening unix socket and delivers events to the client."""

    def __init__(self, commands: dict[str, Command]) -> None:
        self.commands = commands
        self._session: Session | None = None
        self._one_at_a_time = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None

    async def serve(self, listening: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._client, sock=listening)

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        session = self._session
        if session is None or not session.negotiated:
            return  # QEMU drops events nobody receives
        now = time.time()
        seconds = int(now)
        message: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
            "event": name,
        }
        if data is not None:
            message["data"] = data
        session.send(message)

    async def close(self) -> None:
        """Flush what the client has not read yet and hang up (an orderly exit)."""
        if self._server is not None:
            self._server.close()
        session = self._session
        if session is not None:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(session.writer.drain(), 1.0)
            session.writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._one_at_a_time:
            session = Session(writer)
            self._session = session
            try:
                session.send(GREETING)
                splitter = Splitter()
                while chunk := await reader.read(65536):
                    for text in splitter.feed(chunk.decode(errors="replace")):
                        self._handle(session, text)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                self._session = None
                writer.close()

    def _handle(self, session: Session, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            session.send(_error({}, QmpError("JSON parse error, expecting value")))
            return
        if not isinstance(message, dict):
            session.send(_error({}, QmpError("QMP input must be a JSON object")))
            return
        try:
            result = self._dispatch(session, message)
        except QmpError as err:
            session.send(_error(message, err))
            return
        reply: dict[str, Any] = {"return": result}
        if "id" in message:
            reply["id"] = message["id"]
        session.send(reply)

    def _dispatch(self, session: Session, message: dict[str, Any]) -> Any:
        for member in message:
            if member not in MEMBERS or (member == "exec-oob" and not session.oob):
                raise QmpError(f"QMP input member '{member}' is unexpected")
        oob = "exec-oob" in message
        name = message.get("exec-oob" if oob else "execute")
        if name is None:
            raise QmpError("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QmpError(
                f"QMP input member '{'exec-oob' if oob else 'execute'}' must be a string"
            )
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            return self._negotiate(session, arguments)
        if not session.negotiated:
            raise QmpError(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
            )
        command = self.commands.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        if oob and not command.oob:
            raise QmpError(f"The command {name} does not support OOB")
        if command.params is not None:
            check_arguments(command.params, arguments)
        return command.handler(arguments)

    def _negotiate(self, session: Session, arguments: dict[str, Any]) -> dict[str, Any]:
        if session.negotiated:
            raise QmpError(
                "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
            )
        check_arguments({"enable": param("array", required=False)}, arguments)
        for capability in arguments.get("enable", []):
            if capability != "oob":
                raise QmpError(f"Parameter 'enable' does not accept value '{capability}'")
            session.oob = True
        session.negotiated = True
        return {}


def _error(message: dict[str, Any], err: QmpError) -> dict[str, Any]:
    """An error reply; QEMU puts the echoed id first in these (last in a `return`)."""
    body = {"error": {"class": err.error_class, "desc": err.desc}}
    return {"id": message["id"], **body} if "id" in message else body
