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
