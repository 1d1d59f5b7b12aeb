"""whimbrel-pki: a certificate authority for one Whimbrel cluster, and the certificates it signs.

    whimbrel-pki init DIR
    whimbrel-pki issue DIR --host ID | --user NAME | --coordinator [--dns NAME] [--ip IP]

A principal is named by the one URI SAN of its certificate (`spiffe://whimbrel/host/ID`,
`spiffe://whimbrel/user/NAME`, `spiffe://whimbrel/coordinator`). Coordinator certificates carry
DNS and IP SANs (by default `localhost`, `127.0.0.1` and `::1`) and the serverAuth usage; host
certificates carry the DNS names ID and `hosts.whimbrel`, which a migration source checks the
destination's certificate by (QEMU's tls-hostname), but no serverAuth usage; user certificates
carry neither. So no host or user certificate passes a client's check for the coordinator.

Files in DIR: `ca.pem`, `ca-key.pem`, and per principal `<name>.pem` and `<name>-key.pem`, where
<name> is `coordinator`, `host.ID` or `user.NAME`. Every file is created exclusively (an existing
one is never overwritten) and keys are 0600 from the moment they exist.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from whimbrel.tls import COORDINATOR, TlsFiles, host_dns_names, host_principal, user_principal

__all__ = [
    "COORDINATOR",
    "Issued",
    "PkiError",
    "ensure",
    "host_principal",
    "init",
    "issue_coordinator",
    "issue_host",
    "issue_user",
    "user_principal",
]

# Host ids and user names become URI path segments and file names: no '/', no leading '.'.
NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
CA_DAYS, LEAF_DAYS = 3650, 365
DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")


class PkiError(Exception):
    """A CA or certificate could not be made (bad name, missing CA, file already there)."""


@dataclass(frozen=True)
class Issued:
    """The files of one principal: its certificate, its key, and the CA that signed it."""

    principal: str
    cert: Path
    key: Path
    ca: Path

    @property
    def files(self) -> TlsFiles:
        return TlsFiles(self.cert, self.key, self.ca)

    def flags(self) -> list[str]:
        """The `--tls-cert --tls-key --tls-ca` arguments of a program using these files."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite (a re-issued key would silently replace one in use); the mode is
    # set at creation, so a key is never readable by others even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widens past `mode`
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init(directory: Path, days: int = CA_DAYS) -> Path:
    """Make a new CA in `directory` (created if missing); returns the path of ca.pem."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    for path in (cert_path, key_path):
        if path.exists():
            raise PkiError(f"{path} exists: a CA is already there")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Whimbrel CA")])
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    except FileNotFoundError as err:
        raise PkiError(f"no CA in {directory} (run `whimbrel-pki init {directory}`)") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca-key.pem'} is not an EC key made by whimbrel-pki")
    return cert, key


def _issue(
    directory: Path,
    file_name: str,
    principal: str,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    server: bool = False,
    days: int = LEAF_DAYS,
) -> Issued:
    ca_cert, ca_key = _load_ca(directory)
    cert_path, key_path = directory / f"{file_name}.pem", directory / f"{file_name}-key.pem"
    for path in (cert_path, key_path):
        if path.exists():
            raise PkiError(f"{path} exists: certificates are never overwritten")
    try:
        addresses = [ipaddress.ip_address(ip) for ip in ips]
    except ValueError as err:
        raise PkiError(str(err)) from err
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(principal)]
    names += [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(a) for a in addresses]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, principal)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_new(key_path, _key_pem(key), 0o600)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(principal, cert_path, key_path, directory / "ca.pem")


def _check_name(kind: str, name: str) -> None:
    if not NAME.match(name):
        raise PkiError(
            f"{kind} {name!r} is invalid: 1-63 characters of [a-z0-9-], starting with a letter"
        )


def issue_host(directory: Path, host_id: str, days: int = LEAF_DAYS) -> Issued:
    _check_name("host id", host_id)
    principal = host_principal(host_id)
    return _issue(directory, f"host.{host_id}", principal, host_dns_names(host_id), days=days)


def issue_user(directory: Path, name: str, days: int = LEAF_DAYS) -> Issued:
    _check_name("user name", name)
    return _issue(directory, f"user.{name}", user_principal(name), days=days)


def issue_coordinator(
    directory: Path,
    dns: tuple[str, ...] = DEFAULT_DNS,
    ips: tuple[str, ...] = DEFAULT_IPS,
    days: int = LEAF_DAYS,
) -> Issued:
    """A coordinator certificate; it is also a client certificate (a standby or a tool)."""
    return _issue(directory, "coordinator", COORDINATOR, dns, ips, server=True, days=days)


def ensure(directory: Path, kind: str, name: str = "") -> Issued:
    """The certificate of a "host", "user" or "coordinator" (`name` for the first two) in
    `directory`, issued now (and the CA made) unless there already: for test and demo
    clusters, which make their PKI once per directory."""
    if not (directory / "ca.pem").exists():
        init(directory)
    file_name = "coordinator" if kind == "coordinator" else f"{kind}.{name}"
    cert, key = directory / f"{file_name}.pem", directory / f"{file_name}-key.pem"
    if cert.exists() and key.exists():
        principal = {"host": host_principal, "user": user_principal}.get(kind)
        return Issued(
            principal(name) if principal else COORDINATOR, cert, key, directory / "ca.pem"
        )
    if kind == "host":
        return issue_host(directory, name)
    if kind == "user":
        return issue_user(directory, name)
    if kind == "coordinator":
        return issue_coordinator(directory)
    raise PkiError(f"unknown kind of principal {kind!r}: host, user or coordinator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whimbrel-pki", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init_parser = sub.add_parser("init", help="make a new CA in DIR")
    init_parser.add_argument("dir", type=Path)
    init_parser.add_argument("--days", type=int, default=CA_DAYS)
    issue = sub.add_parser("issue", help="issue a certificate signed by DIR's CA")
    issue.add_argument("dir", type=Path)
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--host", metavar="ID", help="a hostd (spiffe://whimbrel/host/ID)")
    who.add_argument("--user", metavar="NAME", help="a person or program")
    who.add_argument("--coordinator", action="store_true", help="a coordinator")
    issue.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="coordinator: a DNS name clients use (repeatable; default localhost)",
    )
    issue.add_argument(
        "--ip",
        action="append",
        metavar="IP",
        help="coordinator: an address clients use (repeatable; default 127.0.0.1 and ::1)",
    )
    issue.add_argument("--days", type=int, default=LEAF_DAYS)
    ns = parser.parse_args(argv)
    try:
        if ns.command == "init":
            print(init(ns.dir, ns.days))
            return 0
        if (ns.dns or ns.ip) and not ns.coordinator:
            parser.error("--dns and --ip are for --coordinator certificates only")
        if ns.host:
            issued = issue_host(ns.dir, ns.host, ns.days)
        elif ns.user:
            issued = issue_user(ns.dir, ns.user, ns.days)
        else:
            dns, ips = tuple(ns.dns or DEFAULT_DNS), tuple(ns.ip or DEFAULT_IPS)
            issued = issue_coordinator(ns.dir, dns, ips, ns.days)
    except (PkiError, OSError) as err:
        print(f"whimbrel-pki: {err}", file=sys.stderr)
        return 1
    print(f"{issued.principal}\n  cert {issued.cert}\n  key  {issued.key}\n  ca   {issued.ca}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
