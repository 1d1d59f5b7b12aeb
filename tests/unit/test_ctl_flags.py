"""whimbrelctl refuses malformed flags itself (exit 2, naming the flag), before it reaches a
coordinator."""

from __future__ import annotations

from pathlib import Path

import pytest

from whimbrel import pki
from whimbrel.ctl import main
from whimbrel.tls import TlsError, TlsFiles


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["limits", "set", "--cluster", "-1"], "--cluster: -1: a whole number from 0 to"),
        # Out of a request field's range: a usage error, not a traceback from protobuf.
        (["vm", "define", "vm-x", "--memory", "-1"], "--memory: -1: a whole number from 0"),
        (["vm", "define", "vm-x", "--vcpus", "5000000000"], "to 4294967295"),
        (["migrate", "vm-1", "--to", "host-b", "--bandwidth", "-1"], "--bandwidth: -1"),
        (["events", "--since", "-1"], "--since: -1"),
        (["events", "--limit", "-5"], "--limit: -5"),
        (["policy", "define", "p", "--downtime-steps", "5000000000"], "below 2**32"),
        (["migration", "set", "m-1", "--bandwidth", "-5"], "--bandwidth: -5"),
        (["vm", "define", "vm-x", "--memory", "lots"], "'lots' is not a whole number"),
        (["policy", "define", "p", "--downtime-steps", "100,x"], "milliseconds, comma-separated"),
        (["policy", "define", "p", "--downtime-steps", "100,0"], "each step above 0 ms"),
        (["host", "drain"], "the following arguments are required: HOST"),
        (["policy", "define", "p", "--progress-timeout", "-1"], "--progress-timeout: -1"),
        (["--timeout", "0", "hosts"], "'0' is not a positive number of seconds"),
        # gRPC would take 99999 modulo 65536: another port.
        (["--coordinator", "127.0.0.1:99999", "hosts"], "a port in 1..65535"),
        (["--coordinator", "", "hosts"], "is not HOST:PORT"),
        (["--coordinator", "127.0.0.1:abc", "hosts"], "is not HOST:PORT"),
    ],
)
def test_bad_flags_exit_2_naming_them(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--coordinator", "127.0.0.1:1", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_key_of_another_certificate_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gRPC takes it and fails each handshake later, which whimbrelctl read as an unreachable
    coordinator (exit 3): it is refused before any connection (exit 2), naming the files."""
    alice, bob = pki.ensure(tmp_path, "user", "alice"), pki.ensure(tmp_path, "user", "bob")
    flags = ["--tls-cert", str(alice.cert), "--tls-key", str(bob.key), "--tls-ca", str(alice.ca)]
    assert main(["--coordinator", "127.0.0.1:1", *flags, "hosts"]) == 2
    assert f"{bob.key} is not the key of {alice.cert}" in capsys.readouterr().err
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a key")
    with pytest.raises(TlsError, match="are no certificate and key"):
        TlsFiles(alice.cert, garbled, alice.ca).read()
    assert len(TlsFiles(alice.cert, alice.key, alice.ca).read()) == 3
