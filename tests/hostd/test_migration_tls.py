"""hostd's migration TLS material: copied with keys 0600 in a 0700 directory, the gRPC key
file left as it was, and a certificate without the host's DNS names refused up front."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from hostd.migration_tls import MigrationTls
from whimbrel import pki
from whimbrel.tls import TlsError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_material_is_copied_with_private_keys(tmp_path: Path) -> None:
    """QEMU's file names, keys and directory private, the key a copy (not a link) of hostd's."""
    pki.init(tmp_path / "pki")
    issued = pki.issue_host(tmp_path / "pki", "host-a")
    installed = MigrationTls.install(issued.files, tmp_path / "state" / "migration-tls", "host-a")
    files = {p.name: mode(p) for p in installed.directory.iterdir()}
    assert files == {
        "ca-cert.pem": 0o644, "server-cert.pem": 0o644, "client-cert.pem": 0o644,
        "server-key.pem": 0o600, "client-key.pem": 0o600,
    }  # fmt: skip
    assert mode(installed.directory) == 0o700
    key = installed.directory / "client-key.pem"
    assert key.read_bytes() == issued.key.read_bytes() and not key.samefile(issued.key)
    again = MigrationTls.install(issued.files, installed.directory, "host-a")  # a restart
    assert again == installed and mode(key) == 0o600


def test_a_certificate_without_the_host_names_is_refused(tmp_path: Path) -> None:
    """A host certificate of another host, or a user's, cannot serve this host's migrations."""
    pki.init(tmp_path / "pki")
    for issued in (pki.issue_host(tmp_path / "pki", "host-b"),
                   pki.issue_user(tmp_path / "pki", "alice")):  # fmt: skip
        with pytest.raises(TlsError, match="lacks the DNS names"):
            MigrationTls.install(issued.files, tmp_path / "migration-tls", "host-a")
    assert not (tmp_path / "migration-tls").exists()
