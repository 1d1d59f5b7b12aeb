"""Migration streams over TLS: the credentials QEMU reads, and what puts a migration on them.

With TLS material (`--tls-cert/--tls-key/--tls-ca`) and unless `--no-migration-tls`, hostd
copies its certificate, key and CA into STATE/migration-tls/ under the names QEMU's
tls-creds-x509 wants (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
`client-key.pem`; keys 0600). Copies, never links: the gRPC key file itself is not touched, and
a copy cannot be widened or swapped through it. Every QEMU hostd starts loads them as two
objects on its command line, `SERVER` (an incoming migration) and `CLIENT` (an outgoing one),
before it drops to `--qemu-user`: that user never needs to read a key.

Both ends verify the other, signed by the CA, and more:

- the source checks the destination's certificate names the destination: QEMU's tls-hostname
  is the host the command names (`peer_host`), or `ANY_HOST` when it names none, which every
  host certificate carries (a host, not a user or the coordinator, whose certificates the same
  CA signs);
- the destination admits the source's certificate only if its subject is that host's
  (`CN=spiffe://whimbrel/host/ID`, tls-authz), or any host's when the command names none: a
  user's certificate cannot feed a VM its state.

A destination serves TLS with a certificate without the serverAuth usage, which host
certificates lack on purpose (whimbrel/tls.py): QEMU (gnutls) does not require it while the
usage extension is not critical, and whimbrel-pki never marks it so.

Post-copy recovery needs nothing more: QEMU keeps these parameters, and migrate-recover goes
out of band, where no other command may come first. Both ends must agree: a source speaking
TLS to a plaintext destination (or the reverse) fails the migration, which then rolls back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from whimbrel.files import write_atomically
from whimbrel.tls import ANY_HOST, TlsError, TlsFiles, host_dns_names, host_principal

__all__ = [
    "ANY_HOST",
    "CLIENT",
    "PEERS",
    "SERVER",
    "MigrationTls",
    "incoming_commands",
    "outgoing_parameters",
]

# QOM ids of the objects in every QEMU hostd starts with migration TLS.
SERVER = "whimbrel-migration-server"
CLIENT = "whimbrel-migration-client"
PEERS = "whimbrel-migration-peers"


@dataclass(frozen=True)
class MigrationTls:
    """The credentials directory QEMU reads (`dir` of its tls-creds-x509 objects)."""

    directory: Path

    @classmethod
    def install(cls, files: TlsFiles, directory: Path, host_id: str) -> MigrationTls:
        """Check the certificate can serve migrations for `host_id` and copy the material
        into `directory` (created 0700); raises TlsError."""
        cert, key, ca = files.read()
        try:
            names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
        except (ValueError, x509.ExtensionNotFound) as err:
            raise TlsError(f"{files.cert}: no usable certificate: {err}") from err
        missing = set(host_dns_names(host_id)) - set(names.value.get_values_for_type(x509.DNSName))
        if missing:
            raise TlsError(
                f"{files.cert} lacks the DNS names {', '.join(sorted(missing))} migration TLS "
                f"checks (issued before it?): issue a new one with `whimbrel-pki issue DIR "
                f"--host {host_id}`, or run with --no-migration-tls"
            )
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        for role in ("server", "client"):
            write_atomically(directory / f"{role}-cert.pem", cert, mode=0o644)
            write_atomically(directory / f"{role}-key.pem", key, mode=0o600)
        write_atomically(directory / "ca-cert.pem", ca, mode=0o644)
        return cls(directory)


def incoming_commands(peer: str) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands that make a destination accept only TLS from host `peer` (a name
    hostd's guard has checked; any host when empty), before migrate-incoming."""
    rule = {"match": f"CN={host_principal(peer)}", "policy": "allow", "format": "exact"}
    if not peer:
        rule.update(match=f"CN={host_principal('*')}", format="glob")
    authz = {"qom-type": "authz-list", "id": PEERS, "policy": "deny", "rules": [rule]}
    parameters = {"tls-creds": SERVER, "tls-authz": PEERS}
    return [("object-add", authz), ("migrate-set-parameters", parameters)]


def outgoing_parameters(peer: str) -> dict[str, str]:
    """migrate-set-parameters for a source that must reach host `peer` (any host when empty)
    over TLS, before migrate (and migrate with resume)."""
    return {"tls-creds": CLIENT, "tls-hostname": peer or ANY_HOST}
