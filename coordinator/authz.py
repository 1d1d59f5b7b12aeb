"""Who may call which RPC: one server interceptor decides, from the caller's certificate.

Roles: viewer < operator < admin for users (`spiffe://whimbrel/user/NAME`), given by the
`--authz FILE` TOML file whose top-level keys are role names with lists of user names
(`operator = ["alice"]`; a user listed under several roles has the highest), reloaded on SIGHUP;
and host, which every `spiffe://whimbrel/host/ID` certificate has and which allows only
`HostService.Connect` (the servicer then checks the Hello names that same host). Health and
reflection are open to any authenticated peer. A method not in the table needs admin.

A refusal answers UNAUTHENTICATED (no Whimbrel principal in the certificate) or
PERMISSION_DENIED (naming the principal and the role it lacks) before the servicer runs, so
nothing is appended; each is counted through `on_refused`.

Errors:
    AuthzError    the roles file is unreadable or malformed
"""

from __future__ import annotations

import enum
import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from coordinator.wrapping import Behavior, WrappingInterceptor, same_kind
from whimbrel.tls import parse_principal, peer_principal

__all__ = ["HOST", "AuthzError", "AuthzInterceptor", "Role", "Roles", "required_role"]

log = logging.getLogger(__name__)


class Role(enum.IntEnum):
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


HOST = "host"
Required = Role | str  # a user role, or HOST

_V1 = "/whimbrel.v1."
RULES: dict[str, Required] = {
    f"{_V1}MigrationService/GetMigration": Role.VIEWER,
    f"{_V1}MigrationService/ListMigrations": Role.VIEWER,
    f"{_V1}MigrationService/WatchMigration": Role.VIEWER,
    f"{_V1}MigrationService/StartMigration": Role.OPERATOR,
    f"{_V1}MigrationService/AbortMigration": Role.OPERATOR,
    f"{_V1}MigrationService/SwitchToPostcopy": Role.OPERATOR,
    f"{_V1}MigrationService/GetMigrationLimits": Role.VIEWER,
    f"{_V1}MigrationService/SetMigrationParameters": Role.OPERATOR,
    f"{_V1}MigrationService/CompleteMigration": Role.OPERATOR,
    f"{_V1}MigrationService/ListPolicies": Role.VIEWER,
    # Cluster-wide: how every later migration converges.
    f"{_V1}MigrationService/DefinePolicy": Role.ADMIN,
    f"{_V1}MigrationService/SetDefaultPolicy": Role.ADMIN,
    # Cluster-wide: how many migrations every host runs at once.
    f"{_V1}MigrationService/SetMigrationLimits": Role.ADMIN,
    f"{_V1}VmService/GetVm": Role.VIEWER,
    f"{_V1}VmService/ListVms": Role.VIEWER,
    f"{_V1}VmService/StartVm": Role.OPERATOR,
    f"{_V1}VmService/StopVm": Role.OPERATOR,
    f"{_V1}VmService/DefineVm": Role.ADMIN,
    f"{_V1}HostService/ListHosts": Role.VIEWER,
    f"{_V1}HostService/CordonHost": Role.OPERATOR,
    f"{_V1}HostService/UncordonHost": Role.OPERATOR,
    f"{_V1}HostService/DrainHost": Role.OPERATOR,
    f"{_V1}HostService/Connect": HOST,
    f"{_V1}EventLogService/ReadEvents": Role.VIEWER,
    # Each call reads and hashes the whole log: not for every viewer to repeat at will.
    f"{_V1}EventLogService/VerifyLog": Role.ADMIN,
}
# Any authenticated peer: load balancers and tools probe these.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def required_role(method: str) -> Required | None:
    """What `method` needs; None when any authenticated peer may call it."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return RULES.get(method, Role.ADMIN)


class AuthzError(Exception):
    """The roles file is unreadable or malformed."""


class Roles:
    """Users' roles, as read from an --authz file (empty: no user has any role)."""

    def __init__(self, users: Mapping[str, Role] | None = None, path: Path | None = None) -> None:
        self.users = dict(users or {})
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Roles:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise AuthzError(f"cannot read roles from {path}: {err}") from err
        users: dict[str, Role] = {}
        for key, names in data.items():
            try:
                role = Role[key.upper()]
            except KeyError:
                known = ", ".join(r.label for r in Role)
                raise AuthzError(f"{path}: unknown role {key!r} (roles: {known})") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise AuthzError(f"{path}: {key} must be a list of user names")
            for name in names:
                users[name] = max(role, users.get(name, role))
        return cls(users, path)

    def reload(self) -> None:
        """Read the file again; on error keep the roles in force (and say why)."""
        if self.path is None:
            return
        try:
            self.users = Roles.load(self.path).users
        except AuthzError as err:
            log.error("%s; keeping the roles in force", err)
            return
        log.info("roles reloaded from %s: %d users", self.path, len(self.users))

    def role_of(self, user: str) -> Role | None:
        return self.users.get(user)


def refusal(method: str, principal: str | None, roles: Roles) -> tuple[grpc.StatusCode, str] | None:
    """Why `principal` may not call `method` (a status and its message), None if it may."""
    if principal is None:
        return None  # plaintext: the insecure loopback mode has no identities to check
    if not principal:
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            f"{method}: the client certificate names no Whimbrel principal "
            "(one URI SAN spiffe://whimbrel/host/ID or spiffe://whimbrel/user/NAME)",
        )
    needed = required_role(method)
    if needed is None:
        return None
    kind, name = parse_principal(principal)
    if needed == HOST:
        if kind == "host":
            return None
        return grpc.StatusCode.PERMISSION_DENIED, f"{principal} lacks role host for {method}"
    assert isinstance(needed, Role)
    role = roles.role_of(name) if kind == "user" else None
    if role is not None and role >= needed:
        return None
    has = f" (has {role.label})" if role is not None else ""
    return (
        grpc.StatusCode.PERMISSION_DENIED,
        f"{principal} lacks role {needed.label}{has} for {method}",
    )


class AuthzInterceptor(WrappingInterceptor):
    """Checks every call before its servicer runs. gRPC gives an interceptor only the method
    name and metadata, so the check is wrapped around the handler, where the call's
    certificate is in reach."""

    def __init__(
        self, roles: Roles, on_refused: Callable[[str, grpc.StatusCode], None] | None = None
    ) -> None:
        self.roles = roles
        self.on_refused = on_refused
        self.refused = 0

    def wrap(self, method: str, behavior: Behavior, streamed: bool = False) -> Behavior:
        async def check(request: Any, context: Any) -> None:
            await self._check(method, context)

        return same_kind(behavior, check)

    async def _check(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        refused = refusal(method, peer_principal(context), self.roles)
        if refused is None:
            return
        code, message = refused
        self.refused += 1
        log.warning("refused: %s", message)
        if self.on_refused is not None:
            self.on_refused(method, code)
        await context.abort(code, message)
