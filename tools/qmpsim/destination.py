"""An incoming migration (`-incoming defer`, then migrate-incoming), as QEMU 7.2 runs it.

`setup` once listening, `active` once the source's stream is accepted (the listener then
closes), `postcopy-active` at the switch, `completed` once the state is loaded: the guest then
runs if autostart is armed (no -S, or an early cont), else it stays paused. A stream that
breaks during pre-copy fails the migration and QEMU 7.2 exits (status 1); during post-copy it
pauses (`postcopy-paused`) until migrate-recover listens again and the source resumes. A TLS
handshake that fails only drops that connection: the destination keeps listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from . import link
from .cmdline import Launch
from .machine import Machine
from .settings import Settings
from .wire import QmpError

__all__ = ["Destination"]

Emit = Callable[[str, "dict[str, Any] | None"], None]
# How long an accepted connection may take to say hello (a port scanner, a stuck peer).
HELLO_LIMIT_S = 10.0


class Destination:
    def __init__(
        self,
        launch: Launch,
        settings: Settings,
        machine: Machine,
        emit: Emit,
        exit_process: Callable[[int], None],
    ) -> None:
        self.launch, self.settings, self.machine, self.emit = launch, settings, machine, emit
        self._exit = exit_process
        self.status = "none"
        self._address: link.Address | None = None
        self._listening: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._link: link.Link | None = None
        self._recovering = False
        self._in_postcopy = False

    def _set(self, status: str) -> None:
        self.status = status
        if self.settings["events"]:
            self.emit("MIGRATION", {"status": status})

    def info(self) -> dict[str, Any]:
        if self.status == "none":
            return {}
        where = {"socket-address": [self._address.socket_address()]} if self._address else {}
        if self.status == "setup":
            return where
        if self.status == "completed":
            return {"status": "completed"}
        return {"status": self.status, **where}

    # --- commands ---

    def migrate_incoming(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if not self.launch.incoming:
            raise QmpError("'-incoming' was not specified on the command line")
        if self.status != "none":
            raise QmpError("The incoming migration has already been started")
        # QEMU 7.2 sends this one before it listens, whatever the events capability says.
        self.emit("MIGRATION", {"status": "setup"})
        self._listen(arguments["uri"])
        self.status = "setup"
        return {}

    def recover(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.status != "postcopy-paused":
            raise QmpError("Migrate recover can only be run when postcopy is paused.")
        if self._recovering:
            # Again before any source came (its resume lost, say): QEMU 7.2.22 accepts it,
            # giving up the earlier listener first, so the same port can serve again
            # (tests/qemu/test_postcopy_recovery.py).
            self._stop_listening()
        # QEMU says setup in an event (whatever the events capability says) while
        # query-migrate still says postcopy-paused.
        self.emit("MIGRATION", {"status": "setup"})
        self._listen(arguments["uri"])
        self._recovering = True
        return {}

    def pause(self) -> bool:
        """migrate-pause on the destination; False when it does not apply here."""
        if self.status != "postcopy-active":
            return False
        asyncio.get_running_loop().call_soon(self._paused)
        return True

    def close(self) -> None:
        self._stop_listening()
        if self._link is not None:
            self._link.close()

    # --- the stream ---

    def _listen(self, uri: str) -> None:
        address = link.parse_uri(uri)
        if address is None:
            raise QmpError(f"unknown migration protocol: {uri}")
        try:
            sock = link.bind(address)
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            if address.path:
                raise QmpError(f"Failed to bind socket to {address.path}: {reason}") from None
            raise QmpError(f"Failed to find an available port: {reason}") from None
        self._stop_listening()
        if address.port == 0 and not address.path:
            address = link.Address(host=address.host, port=sock.getsockname()[1])
        self._address, self._listening = address, sock
        asyncio.get_running_loop().create_task(self._serve(sock), name="migration-listen")

    async def _serve(self, sock: socket.socket) -> None:
        server = await link.serve(sock, self._accepted)
        if self._listening is sock:
            self._server = server
        else:
            server.close()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
        elif self._listening is not None:
            self._listening.close()
        self._server = self._listening = None

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(self._read(reader), HELLO_LIMIT_S)
            if self._link is not None or hello is None:
                raise ConnectionError("not a migration stream")
            refusal = self._refusal(hello)
            if refusal == "garbage":
                raise ConnectionError("a TLS stream to a plain destination")
            if refusal:
                writer.write(json.dumps({"t": "refused", "why": refusal}).encode() + b"\n")
                writer.close()
                return  # and QEMU keeps listening
            writer.write(json.dumps({"t": "welcome", "names": self._names()}).encode() + b"\n")
            start = await asyncio.wait_for(self._read(reader), HELLO_LIMIT_S)
            if start is None or start.get("t") != "start":
                writer.close()
                return  # the source refused this destination's certificate
        except (ConnectionError, OSError, TimeoutError, ValueError):
            writer.close()
            if self.status == "setup" and not self._recovering:
                self._fail()  # what QEMU does with a stream it cannot load
            return
        self._stop_listening()
        self._link = link.Link(reader, writer, self._on_message, self._on_lost)
        if self._recovering:
            self._recovering = False
            self._set("postcopy-recover")
            self._set("postcopy-active")
        else:
            self._set("active")

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
        line = await reader.readline()
        if not line:
            return None
        message = json.loads(line)
        return message if isinstance(message, dict) else None

    def _refusal(self, hello: dict[str, Any]) -> str:
        if bool(hello.get("resume")) != self._recovering:
            return "this destination is not waiting for that kind of stream"
        creds = self.settings.parameters["tls-creds"]
        tls = hello.get("tls")
        if not creds:
            return "garbage" if tls is not None else ""
        if tls is None:
            return "TLS handshake failed: the destination requires TLS"
        authz_id = self.settings.parameters["tls-authz"]
        authz = self.machine.objects.get(authz_id) if authz_id else None
        if authz_id and authz is None:
            return f"TLS handshake failed: no authorization object '{authz_id}'"
        subject = str(tls.get("subject", ""))
        if not link.authorized(subject, authz):
            return f"TLS handshake failed: peer '{subject}' is not authorized"
        return ""

    def _names(self) -> list[str]:
        creds = self.launch.tls.get(self.settings.parameters["tls-creds"] or "")
        if creds is None:
            return []
        return list(link.certificate(f"{creds.directory}/server-cert.pem").names)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "postcopy" and self.status == "active":
            self._in_postcopy = True
            self._set("postcopy-active")
            self.machine.incoming_loaded()
        elif kind == "complete" and self.status in ("active", "postcopy-active"):
            self.machine.incoming_loaded()
            self._set("completed")
            if self._link is not None:
                self._link.send({"t": "loaded"})

    def _on_lost(self) -> None:
        self._link = None
        if self.status in ("setup", "active"):
            self._fail()
        elif self.status in ("postcopy-active", "postcopy-recover"):
            self._set("postcopy-paused")

    def _paused(self) -> None:
        if self.status == "postcopy-active" and self._link is not None:
            self._link.close()
            self._link = None
            self._set("postcopy-paused")

    def _fail(self) -> None:
        self._set("failed")
        with contextlib.suppress(Exception):
            self._stop_listening()
        self._exit(1)  # QEMU 7.2 exits when its incoming pre-copy fails
