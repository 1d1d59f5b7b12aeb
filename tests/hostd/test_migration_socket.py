"""hostd sets TCP_NODELAY on another process's connection to a migration peer, on that very
socket, through a duplicate of its descriptor: a real child process, real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hostd.migration_socket import set_nodelay

# The child connects to the port given, says "connected", then answers each line it reads with
# its socket's TCP_NODELAY setting.
CHILD = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.connect((sys.argv[1], int(sys.argv[2])))
print("connected", flush=True)
for _ in sys.stdin:
    print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
"""


@pytest.fixture(params=["127.0.0.1", "::1"])
def connected(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen[str], str]]:
    host = request.param
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with subprocess.Popen(
            [sys.executable, "-c", CHILD, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                assert child.stdout is not None and child.stdout.readline() == "connected\n"
                peer, _ = listener.accept()
                with peer:
                    uri = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
                    yield child, uri
            finally:
                child.kill()


def nodelay_in(child: subprocess.Popen[str]) -> str:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("?\n")
    child.stdin.flush()
    return child.stdout.readline().strip()


def test_the_connection_to_the_peer_gets_nodelay(
    connected: tuple[subprocess.Popen[str], str],
) -> None:
    child, uri = connected
    assert nodelay_in(child) == "0"
    assert set_nodelay(child.pid, uri) == 1
    assert nodelay_in(child) == "1"


def test_a_connection_to_another_peer_is_left_alone(
    connected: tuple[subprocess.Popen[str], str],
) -> None:
    child, uri = connected
    other = uri.rpartition(":")[0] + ":1"
    assert set_nodelay(child.pid, other) == 0
    assert nodelay_in(child) == "0"
