"""Errors of the pure core.

    CoreError                      root; carries structured fields, never a gRPC status
    ├── InvalidRequest             malformed input (a bad name, same source and destination)
    ├── NotFound                   unknown VM, host or migration
    ├── AlreadyExists              the name or id is taken
    ├── HostUnavailable            a host the request needs is not connected
    └── IllegalTransition          the request is not allowed in the state found

The gRPC servicers alone map these to status codes.
"""

from __future__ import annotations

from collections.abc import Iterable


class CoreError(Exception):
    """Root of the core's errors."""


class InvalidRequest(CoreError):
    """The request is malformed; nothing was decided."""


class NotFound(CoreError):
    """A named VM, host or migration does not exist."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name


class AlreadyExists(CoreError):
    """A name or id is already taken."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


class HostUnavailable(CoreError):
    """A host the request needs has no open stream."""

    def __init__(self, host_id: str) -> None:
        super().__init__(f"host {host_id!r} is not connected")
        self.host_id = host_id


class IllegalTransition(CoreError):
    """The request is not allowed in the state found.

    Carries the subject (e.g. "migration m-1"), the state found and the states that would allow
    the request, so an operator sees both.
    """

    def __init__(self, subject: str, action: str, found: str, allowed: Iterable[str]) -> None:
        self.subject = subject
        self.action = action
        self.found = found
        self.allowed = tuple(allowed)
        allowed_text = ", ".join(self.allowed) or "none"
        super().__init__(f"cannot {action} {subject}: it is {found} (allowed: {allowed_text})")
