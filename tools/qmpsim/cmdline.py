"""QEMU's command line, as far as qmpsim models it.

What changes behaviour is kept in `Launch`: the VM's name and RAM size, the QMP socket, the
pidfile, daemonizing, `-incoming`, `-S`, the log file, `-runas`, TLS credentials. What only
shapes a real guest (machine, CPUs, display, disks, NICs, sandbox) is accepted and ignored,
after the checks QEMU makes before it starts (a disk that cannot be opened fails the launch
here too). Options qmpsim cannot honour are refused with a message naming qmpsim, never
ignored silently: another monitor, a QMP socket that is not a unix one, unknown objects.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

__all__ = ["CmdlineError", "Launch", "TlsCreds", "parse", "split_options"]

PROGRAM = "qemu-system-x86_64"
VERSION = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
# Options taking a value that change nothing simulated.
IGNORED_WITH_VALUE = frozenset(
    [
        "-machine",
        "-M",
        "-smp",
        "-display",
        "-serial",
        "-monitor",
        "-sandbox",
        "-netdev",
        "-device",
        "-cpu",
        "-accel",
        "-vga",
        "-boot",
        "-L",
        "-d",
        "-kernel",
        "-initrd",
        "-append",
        "-rtc",
        "-global",
        "-uuid",
    ]
)
IGNORED_FLAGS = frozenset(
    ["-nodefaults", "-nographic", "-no-user-config", "-enable-kvm", "-no-reboot", "-no-shutdown"]
)
REFUSED = frozenset(["-chardev", "-mon", "-loadvm", "-snapshot", "-qmp-pretty", "-gdb", "-s"])
OBJECTS_IGNORED = frozenset(("memory-backend-ram", "memory-backend-file", "memory-backend-memfd"))
SIZE_SUFFIX = {"": 1 << 20, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class CmdlineError(Exception):
    """A command line QEMU (or qmpsim) refuses; the message is what QEMU would print."""


@dataclass(frozen=True)
class TlsCreds:
    """A tls-creds-x509 object: where its certificates are, and which end it serves."""

    id: str
    directory: str
    endpoint: str


@dataclass
class Launch:
    name: str = ""
    ram_bytes: int = 128 << 20
    qmp: str = ""
    pidfile: str = ""
    daemonize: bool = False
    # "defer", a URI to listen on at once, or "" (not a migration destination).
    incoming: str = ""
    # -S: the guest does not run until cont.
    paused: bool = False
    log: str = ""
    runas: str = ""
    tls: dict[str, TlsCreds] = field(default_factory=dict)
    version: bool = False


def split_options(text: str) -> list[str]:
    """QEMU's `a,b=c,d=e,,f` lists: a doubled comma is a comma inside a value."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def _properties(parts: list[str]) -> dict[str, str]:
    props = {}
    for part in parts:
        key, sep, value = part.partition("=")
        props[key] = value if sep else "on"
    return props


def _size(option: str, text: str) -> int:
    props = text.split(",", maxsplit=1)[0]
    value = props[len("size=") :] if props.startswith("size=") else props
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bBkKmMgGtT]?)", value)
    if match is None:
        raise CmdlineError(
            f"{option} {text}: Parameter 'size' expects a non-negative number below 2^64"
        )
    return int(float(match[1]) * SIZE_SUFFIX[match[2].lower()])


def _qmp(text: str) -> str:
    parts = split_options(text)
    if not parts[0].startswith("unix:"):
        raise CmdlineError(f"-qmp {text}: qmpsim simulates QMP on a unix socket only")
    props = _properties(parts[1:])
    server = props.get("server", "off") in ("on", "yes")
    nowait = props.get("wait", "on") == "off" or "nowait" in props
    if not (server and nowait):
        raise CmdlineError(f"-qmp {text}: qmpsim needs server=on,wait=off")
    return parts[0][len("unix:") :]


def _object(text: str, launch: Launch) -> None:
    if text.startswith("{"):
        try:
            props = {str(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as err:
            raise CmdlineError(f"-object {text}: {err}") from None
        kind = props.pop("qom-type", "")
    else:
        parts = split_options(text)
        kind, props = parts[0], _properties(parts[1:])
        kind = props.pop("qom-type", kind)
    if kind in OBJECTS_IGNORED:
        return
    if kind == "tls-creds-x509":
        creds = TlsCreds(props.get("id", ""), props.get("dir", ""), props.get("endpoint", "client"))
        if not creds.id:
            raise CmdlineError(f"-object {text}: Parameter 'id' is missing")
        needed = ["ca-cert.pem"]
        if creds.endpoint == "server":
            needed += ["server-cert.pem", "server-key.pem"]
        for name in needed:
            path = os.path.join(creds.directory, name)
            if not os.access(path, os.R_OK):
                missing = f"Unable to access credentials {path}: No such file or directory"
                raise CmdlineError(f"-object {text}: {missing}")
        launch.tls[creds.id] = creds
        return
    raise CmdlineError(f"-object {text}: qmpsim does not simulate objects of type '{kind}'")


def _drive(text: str) -> None:
    props = _properties(split_options(text))
    path = props.get("file", "")
    if path and not os.path.exists(path):
        raise CmdlineError(f"-drive {text}: Could not open '{path}': No such file or directory")


def parse(argv: list[str]) -> Launch:
    """`argv` without the program name; raises CmdlineError as QEMU would exit."""
    launch = Launch()
    args = iter(argv)
    for given in args:
        option = given[1:] if given.startswith("--") else given  # QEMU takes -opt and --opt
        if option in ("-version", "-h", "-help"):
            launch.version = True
            continue
        if option in IGNORED_FLAGS:
            continue
        if option == "-daemonize":
            launch.daemonize = True
            continue
        if option == "-S":
            launch.paused = True
            continue
        if option in REFUSED:
            raise CmdlineError(f"{option}: not simulated by qmpsim")
        if not option.startswith("-"):
            raise CmdlineError(f"{option}: qmpsim takes no disk image as a bare argument")
        value = next(args, None)
        if value is None:
            if option in IGNORED_WITH_VALUE or option in _VALUED:
                raise CmdlineError(f"{option}: requires an argument")
            raise CmdlineError(f"{option}: invalid option")
        if option in IGNORED_WITH_VALUE:
            continue
        handler = _VALUED.get(option)
        if handler is None:
            raise CmdlineError(f"{option}: invalid option")
        handler(launch, value)
    if not launch.version and not launch.qmp:
        raise CmdlineError("qmpsim needs -qmp unix:PATH,server=on,wait=off")
    return launch


def _name(launch: Launch, value: str) -> None:
    launch.name = _properties(split_options(value)).get("guest") or split_options(value)[0]


def _incoming(launch: Launch, value: str) -> None:
    if value != "defer" and not value.startswith(("tcp:", "unix:")):
        raise CmdlineError(f"-incoming {value}: qmpsim migrates over tcp: and unix: only")
    launch.incoming = value


def _set(attribute: str):  # type: ignore[no-untyped-def]
    def handler(launch: Launch, value: str) -> None:
        setattr(launch, attribute, value)

    return handler


def _ram(launch: Launch, value: str) -> None:
    launch.ram_bytes = _size("-m", value)


def _qmp_option(launch: Launch, value: str) -> None:
    if launch.qmp:
        raise CmdlineError(f"-qmp {value}: qmpsim serves one QMP monitor")
    launch.qmp = _qmp(value)


_VALUED = {
    "-name": _name,
    "-m": _ram,
    "-qmp": _qmp_option,
    "-pidfile": _set("pidfile"),
    "-D": _set("log"),
    "-runas": _set("runas"),
    "-incoming": _incoming,
    "-object": lambda launch, value: _object(value, launch),
    "-drive": lambda launch, value: _drive(value),
}
