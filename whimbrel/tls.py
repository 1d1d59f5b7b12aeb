"""Mutual TLS for every Whimbrel channel: the flags, the credentials, and the peer's principal.

Every program takes `--tls-cert FILE --tls-key FILE --tls-ca FILE` (all three or none). A
principal is the one `spiffe://whimbrel/...` URI SAN of a certificate signed by the CA:
`spiffe://whimbrel/host/ID`, `spiffe://whimbrel/user/NAME` or `spiffe://whimbrel/coordinator`.
Servers require a client certificate: a client without one fails the handshake and never reaches
an RPC. gRPC Python shows a client nothing of the server's certificate beyond its hostname check,
so a hostd checks the coordinator's principal with one TLS handshake of its own
(`check_server_principal`) before it opens its stream.

Host certificates also carry DNS names, for migration streams (hostd/migration_tls.py), where
QEMU checks names, not URIs: the host id itself, and `ANY_HOST`, the name every host shares.
They stay client-only (no serverAuth usage), so no TLS client that checks the usage, gRPC's
included, takes one for the coordinator's whatever names it carries.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "ANY_HOST",
    "COORDINATOR",
    "TRUST_DOMAIN",
    "TlsError",
    "TlsFiles",
    "add_tls_flags",
    "aio_channel",
    "channel",
    "check_server_principal",
    "host_dns_names",
    "host_principal",
    "parse_principal",
    "peer_principal",
    "server_credentials",
    "tls_files",
    "user_principal",
]

TRUST_DOMAIN = "spiffe://whimbrel"
COORDINATOR = f"{TRUST_DOMAIN}/coordinator"
# The DNS name every host certificate carries: never a host id (those have no dots).
ANY_HOST = "hosts.whimbrel"


def host_principal(host_id: str) -> str:
    return f"{TRUST_DOMAIN}/host/{host_id}"


def host_dns_names(host_id: str) -> tuple[str, str]:
    """The DNS names of a host's certificate: its id, then the name all hosts share."""
    return host_id, ANY_HOST


def user_principal(name: str) -> str:
    return f"{TRUST_DOMAIN}/user/{name}"


def parse_principal(principal: str) -> tuple[str, str]:
    """("host", ID), ("user", NAME), ("coordinator", ""), or ("", "") for anything else."""
    if principal == COORDINATOR:
        return "coordinator", ""
    kind, _, name = principal.removeprefix(f"{TRUST_DOMAIN}/").partition("/")
    if principal.startswith(f"{TRUST_DOMAIN}/") and kind in ("host", "user") and name:
        return (kind, name) if "/" not in name else ("", "")
    return "", ""


class TlsError(Exception):
    """TLS material is unusable, or a peer is not who it must be."""


@dataclass(frozen=True)
class TlsFiles:
    """A principal's certificate and key, and the CA every peer must be signed by."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            material = self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()
        except OSError as err:
            raise TlsError(f"cannot read TLS material: {err}") from err
        # gRPC would take a key of another certificate and fail each handshake later, read
        # by a client as "cannot reach" and by a server as peers that never connect.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as err:
            if "KEY_VALUES_MISMATCH" in str(err):
                raise TlsError(f"{self.key} is not the key of {self.cert}") from err
            raise TlsError(f"{self.cert} and {self.key} are no certificate and key: {err}") from err
        return material


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mutual TLS (all three, or none)")
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="this program's certificate")
    group.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key")
    group.add_argument("--tls-ca", type=Path, metavar="FILE", help="the CA peers are signed by")


def tls_files(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> TlsFiles | None:
    """The files given with the TLS flags, None when none was; a partial set is a usage error."""
    given = [ns.tls_cert, ns.tls_key, ns.tls_ca]
    if not any(given):
        return None
    if not all(given):
        parser.error("--tls-cert, --tls-key and --tls-ca go together")
    return TlsFiles(ns.tls_cert, ns.tls_key, ns.tls_ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def _channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(ca, key, cert)


def channel(
    target: str, files: TlsFiles | None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking channel to `target`: mutual TLS with `files`, plaintext without."""
    if files is None:
        return grpc.insecure_channel(target, options)
    return grpc.secure_channel(target, _channel_credentials(files), options)


def aio_channel(
    target: str, files: TlsFiles | None, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to `target`: mutual TLS with `files`, plaintext without."""
    if files is None:
        return grpc.aio.insecure_channel(target, options)
    return grpc.aio.secure_channel(target, _channel_credentials(files), options)


def peer_principal(context: Any) -> str | None:
    """The caller's principal; None when the call did not come over TLS (insecure loopback
    mode), "" when its certificate names no single Whimbrel principal."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    uris: list[str] = [u.decode() for u in auth.get("peer_uri", []) if u.startswith(b"spiffe://")]
    if len(uris) != 1 or parse_principal(uris[0]) == ("", ""):
        return ""
    return uris[0]


async def check_server_principal(
    target: str, files: TlsFiles, expected: str = COORDINATOR, limit: float = 5.0
) -> None:
    """Handshake with `target` and raise TlsError unless its certificate, signed by the CA and
    valid for the address dialled, names `expected`."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(files.ca))
        context.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as err:
        raise TlsError(f"cannot use TLS material: {err}") from err
    context.set_alpn_protocols(["h2"])
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(
                host, int(port), ssl=context, server_hostname=host
            )
    except (OSError, TimeoutError, ssl.SSLError) as err:
        raise TlsError(f"TLS handshake with {target} failed: {err}") from err
    try:
        cert = writer.get_extra_info("peercert") or {}
    finally:
        writer.close()
        # The server may drop a connection that never speaks HTTP/2: nothing to do about it.
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    del reader
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if uris != [expected]:
        raise TlsError(f"{target} presents {', '.join(uris) or 'no principal'}, not {expected}")
