"""Trust as the programs see it: whimbrel-pki's files, the coordinator's safe defaults without
TLS material, and roles reloaded on SIGHUP by a real coordinator process."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.log import SqliteEventStore
from coordinator.main import is_loopback, metrics_address
from tools.cluster import BIN, Process, spawn
from whimbrel import pki, tls
from whimbrel.v1 import vm_pb2, vm_pb2_grpc


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_pki_makes_files_with_private_keys_and_never_overwrites(tmp_path: Path) -> None:
    """init and issue make ca.pem and <name>.pem/<name>-key.pem, keys 0600 even under a
    permissive umask, each principal as its only URI SAN; issuing again fails and keeps the
    first files."""
    directory = tmp_path / "pki"
    pki_bin = str(BIN / "whimbrel-pki")
    old_umask = os.umask(0)
    try:
        assert run(pki_bin, "init", str(directory)).returncode == 0
        assert run(pki_bin, "issue", str(directory), "--host", "host-a").returncode == 0
        assert run(pki_bin, "issue", str(directory), "--user", "alice").returncode == 0
        made = run(pki_bin, "issue", str(directory), "--coordinator", "--dns", "coord.example",
                   "--ip", "127.0.0.1")  # fmt: skip
        assert made.returncode == 0, made.stderr
    finally:
        os.umask(old_umask)
    names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert names == {
        "ca.pem": 0o644, "ca-key.pem": 0o600,
        "host.host-a.pem": 0o644, "host.host-a-key.pem": 0o600,
        "user.alice.pem": 0o644, "user.alice-key.pem": 0o600,
        "coordinator.pem": 0o644, "coordinator-key.pem": 0o600,
    }  # fmt: skip
    expected = {
        "host.host-a.pem": [tls.host_principal("host-a")],
        "user.alice.pem": [tls.user_principal("alice")],
        "coordinator.pem": [tls.COORDINATOR],
    }
    for name, uris in expected.items():
        cert = x509.load_pem_x509_certificate((directory / name).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == uris
        dns = san.get_values_for_type(x509.DNSName)
        expected_dns = {
            "coordinator.pem": ["coord.example"],
            "host.host-a.pem": ["host-a", tls.ANY_HOST],
        }
        assert dns == expected_dns.get(name, [])
        # Only the coordinator serves gRPC: a host's DNS names make no coordinator of it.
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (name == "coordinator.pem")
    key_before = (directory / "user.alice-key.pem").read_bytes()
    again = run(pki_bin, "issue", str(directory), "--user", "alice")
    assert again.returncode == 1 and "exists" in again.stderr
    assert (directory / "user.alice-key.pem").read_bytes() == key_before
    assert run(pki_bin, "init", str(directory)).returncode == 1
    bad = run(pki_bin, "issue", str(directory), "--user", "../root")
    assert bad.returncode == 1 and "invalid" in bad.stderr
    assert not (tmp_path / "root.pem").exists()


def test_without_tls_a_non_loopback_listen_exits_2_and_loopback_says_so(tmp_path: Path) -> None:
    """Without TLS material a non-loopback address (or --authz) exits 2 before touching the
    log; on loopback the coordinator serves and says it is loopback only."""
    db = tmp_path / "w.db"
    coordinator = str(BIN / "whimbrel-coordinator")
    for listen in ("0.0.0.0:0", "[::]:0", "example.org:7700"):
        result = run(coordinator, "--db", str(db), "--listen", listen)
        assert result.returncode == 2, result.stderr
        assert f"refusing to serve {listen} without TLS" in result.stderr
    result = run(coordinator, "--db", str(db), "--authz", str(tmp_path / "roles.toml"))
    assert result.returncode == 2 and "--authz needs --tls-cert" in result.stderr
    if db.exists():
        store = SqliteEventStore(db)
        assert list(store.read()) == []
        store.close()
    process = spawn("coordinator", [coordinator, "--db", str(db), "--listen", "127.0.0.1:0"],
                    tmp_path / "c.log", pipe_stdout=True)  # fmt: skip
    try:
        assert process.popen.stdout is not None
        line = process.popen.stdout.readline().decode()
        assert "listening on port" in line
        with grpc.insecure_channel(f"127.0.0.1:{line.split()[-1]}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    finally:
        assert process.stop() == 0
    assert "no TLS material: serving loopback only" in (tmp_path / "c.log").read_text()


def start_tls(tmp_path: Path, authz: Path) -> tuple[Process, str]:
    coordinator = pki.ensure(tmp_path / "pki", "coordinator")
    args = [str(BIN / "whimbrel-coordinator"), "--db", str(tmp_path / "w.db"), "--listen",
            "127.0.0.1:0", *coordinator.flags(), "--authz", str(authz)]  # fmt: skip
    process = spawn("coordinator", args, tmp_path / "c.log", pipe_stdout=True)
    assert process.popen.stdout is not None
    line = process.popen.stdout.readline().decode()
    assert "listening on port" in line, (tmp_path / "c.log").read_text()
    return process, f"127.0.0.1:{line.split()[-1]}"


def test_sighup_reloads_roles_and_a_broken_file_keeps_them(tmp_path: Path) -> None:
    """carol is refused until the roles file names her viewer and the coordinator gets SIGHUP;
    a malformed file on the next SIGHUP is reported and the roles in force stay."""
    authz = tmp_path / "roles.toml"
    authz.write_text('admin = ["root"]\n')
    process, address = start_tls(tmp_path, authz)
    carol = pki.ensure(tmp_path / "pki", "user", "carol").files
    try:
        with tls.channel(address, carol) as channel:
            vms = vm_pb2_grpc.VmServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                vms.ListVms(vm_pb2.ListVmsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "spiffe://whimbrel/user/carol lacks role viewer" in (err.value.details() or "")
            authz.write_text('admin = ["root"]\nviewer = ["carol"]\n')
            process.popen.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while True:  # the signal is handled asynchronously; wait for the log line
                if "roles reloaded" in (tmp_path / "c.log").read_text():
                    break
                assert time.monotonic() < deadline, "no reload logged"
                time.sleep(0.05)
            assert list(vms.ListVms(vm_pb2.ListVmsRequest(), timeout=10).vms) == []
            authz.write_text("viewer = [")
            process.popen.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "keeping the roles in force" not in (tmp_path / "c.log").read_text():
                assert time.monotonic() < deadline, "no reload failure logged"
                time.sleep(0.05)
            assert list(vms.ListVms(vm_pb2.ListVmsRequest(), timeout=10).vms) == []
    finally:
        assert process.stop() == 0


def test_metrics_bind_loopback_unless_a_host_is_given() -> None:
    """A bare metrics port (or :PORT) is served on 127.0.0.1; loopback is told by address."""
    assert metrics_address("9464") == metrics_address(":9464") == "127.0.0.1:9464"
    assert metrics_address("0.0.0.0:9464") == "0.0.0.0:9464"
    loopback = ["127.0.0.1:7700", "127.3.4.5:0", "[::1]:7700", "localhost:7700"]
    assert [is_loopback(a) for a in loopback] == [True] * 4
    others = ["0.0.0.0:7700", "[::]:7700", "10.0.0.1:7700", "coordinator.example:7700"]
    assert [is_loopback(a) for a in others] == [False] * 4
