"""hostd's errors.

HostdError                 root; carries the VM and, for QEMU refusals, the raw QMP reply
├── QmpError               QEMU answered a command with an error
├── QmpUnavailable         QMP could not be reached (QEMU gone or not yet up)
├── LaunchFailed           QEMU did not start
├── LeaseError             the lease could not be acquired or released
├── NetworkError           a network driver step failed
└── CommandRejected        the command was refused without acting (stale epoch, bad args)
"""

from __future__ import annotations


class HostdError(Exception):
    def __init__(self, message: str, *, vm: str = "") -> None:
        super().__init__(message)
        self.vm = vm


class QmpError(HostdError):
    """QEMU refused a command; `error_class` and `reply` are QEMU's own."""

    def __init__(
        self, message: str, *, vm: str, command: str, error_class: str, reply: object
    ) -> None:
        super().__init__(f"{command}: {message}", vm=vm)
        self.command = command
        self.error_class = error_class
        self.reply = reply


class QmpUnavailable(HostdError):
    pass


class LaunchFailed(HostdError):
    pass


class QemuMayRun(LaunchFailed):
    """A launch refused because a QEMU of the VM runs here, or cannot be ruled out."""


class LeaseError(HostdError):
    pass


class NetworkError(HostdError):
    pass


class CommandRejected(HostdError):
    pass


def sendable(text: str) -> str:
    """`text` as a protobuf string can carry it. JSON can carry lone surrogates (a QEMU's
    error text, say), which protobuf refuses: a message with one could not be built, and the
    event or answer carrying it would never be sent. They become "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")
