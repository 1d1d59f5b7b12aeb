"""The migration stream between two qmpsim processes: JSON lines over the socket the URI names.

No RAM crosses it, only what the two ends must agree on: the source's hello (is it a resume,
its TLS identity), the destination's welcome (its TLS names) or refusal, the switch to
post-copy, the end of the device state, and the destination's word that it loaded it (QEMU's
return path). A peer that dies closes the socket, and the other end sees it at once, as QEMU
does when its stream breaks.

Migration TLS is modelled, not performed: both ends must agree on it, the destination admits
the source by its certificate's subject (tls-authz) and the source checks the destination's
certificate names tls-hostname, read from the credentials' files; nothing is encrypted.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Address", "Link", "PeerIdentity", "authorized", "bind", "certificate", "connect", "parse_uri",
    "serve",
]  # fmt: skip

Message = dict[str, Any]


@dataclass(frozen=True)
class Address:
    """Where a migration stream goes: tcp HOST:PORT, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def describe(self) -> str:
        return self.path if self.path else f"{self.host}:{self.port}"

    def socket_address(self) -> dict[str, Any]:
        """query-migrate's `socket-address` entry, as QEMU shows it."""
        if self.path:
            return {"path": self.path, "type": "unix"}
        return {"port": str(self.port), "ipv4": True, "host": self.host, "type": "inet"}


def parse_uri(uri: str) -> Address | None:
    if uri.startswith("unix:") and len(uri) > len("unix:"):
        return Address(path=uri[len("unix:") :])
    if uri.startswith("tcp:"):
        host, sep, port = uri[len("tcp:") :].rpartition(":")
        if sep and port.isdigit():
            return Address(host=host.strip("[]"), port=int(port))
    return None


class Link:
    """One connected stream; `on_lost` runs once if the peer goes (never after `close`)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Callable[[Message], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._reader, self._writer = reader, writer
        self._on_message, self._on_lost = on_message, on_lost
        self._closed = False
        self._task = asyncio.create_task(self._read(), name="migration-stream")

    def send(self, message: Message) -> None:
        if not self._closed and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        self._closed = True
        self._writer.close()
        if self._task is not asyncio.current_task():
            self._task.cancel()

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                if self._closed:
                    return
                try:
                    message = json.loads(line)
                except ValueError:
                    break  # not a qmpsim peer: as broken as a cut stream
                self._on_message(message)
        except (ConnectionError, OSError, asyncio.LimitOverrunError, ValueError):
            pass
        if not self._closed:
            self._closed = True
            self._writer.close()
            self._on_lost()


async def connect(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.path:
        return await asyncio.open_unix_connection(address.path)
    return await asyncio.open_connection(address.host, address.port)


def bind(address: Address) -> socket.socket:
    """A listening socket at `address`, bound at once so a QMP command can report failure."""
    if address.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.path
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target = (address.host, address.port)
    try:
        sock.bind(target)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve(
    sock: socket.socket,
    accepted: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> asyncio.AbstractServer:
    if sock.family == socket.AF_UNIX:
        return await asyncio.start_unix_server(accepted, sock=sock)
    return await asyncio.start_server(accepted, sock=sock)


@dataclass(frozen=True)
class PeerIdentity:
    """What a certificate says about its holder: its subject (RFC 4514) and DNS names."""

    subject: str
    names: tuple[str, ...]


ATTRIBUTES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
              "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}  # fmt: skip


def certificate(path: str) -> PeerIdentity:
    """The identity in PEM certificate `path` ("" and no names when it cannot be read)."""
    import ssl  # only for a migration over TLS: it weighs megabytes of every idle VM

    try:
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError, AttributeError):
        return PeerIdentity("", ())
    rdns = [
        f"{ATTRIBUTES.get(key, key)}={value}"
        for rdn in decoded.get("subject", ())
        for key, value in rdn
    ]
    names = tuple(value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS")
    return PeerIdentity(",".join(reversed(rdns)), names)


def authorized(subject: str, authz: dict[str, Any] | None) -> bool:
    """Whether an authz-list object admits `subject` (no object: any verified peer)."""
    if authz is None:
        return True
    for rule in authz.get("rules", []):
        match = str(rule.get("match", ""))
        glob = rule.get("format", "exact") == "glob"
        if fnmatch.fnmatchcase(subject, match) if glob else subject == match:
            return bool(rule.get("policy", "deny") == "allow")
    return bool(authz.get("policy", "deny") == "allow")
