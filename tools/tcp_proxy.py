"""A TCP relay the test controls: it forwards connections to a target and can cut them all
at once (as a network failure would), freeze them (as a black hole would: nothing relayed,
nothing closed), or refuse new ones. It keeps the first bytes each client sent (`openings`):
what the stream speaks, TLS or not."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

# How a TLS stream opens: a handshake record, version 3.x (QEMU's plaintext one: "QEVM").
TLS_HANDSHAKE = b"\x16\x03"


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.accepted = 0
        self.openings: list[bytes] = []
        self.refusing = False
        # One per relayed connection: set, its pumps stop relaying (and reading) for good.
        self._frozen: list[threading.Event] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        self._closed.set()
        self.cut()

    def freeze(self) -> None:
        """Stop relaying on every connection open now, without closing any: a link that
        carries nothing and reports nothing (a middlebox that lost its state, a peer that
        stopped reading). Neither end gets an error; what was in flight is lost. New
        connections are relayed as before."""
        with self._lock:
            frozen = list(self._frozen)
        for stop in frozen:
            stop.set()

    def cut(self) -> None:
        """Reset every relayed connection (RST, like a failed link)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            # shutdown first: close() alone does not reach a socket a pump thread is blocked
            # in recv() on, so neither end would notice.
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            frozen = threading.Event()
            with self._lock:
                self._sockets += [client, upstream]
                self._frozen.append(frozen)
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                pump = threading.Thread(
                    target=self._pump, args=(a, b, a is client, frozen), daemon=True
                )
                pump.start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, outbound: bool, frozen: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if frozen.is_set():
                    # Read no more either, so the sender's buffers fill and it blocks.
                    self._closed.wait()
                    return
                if outbound:
                    with self._lock:
                        self.openings.append(data[:8])
                    outbound = False
                dst.sendall(data)
        if frozen.is_set():
            return  # an end that closed is not told to the other either
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
